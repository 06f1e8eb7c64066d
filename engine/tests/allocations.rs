//! Resolving a static flag, or a targeting rule that compares context
//! values with literals, allocates nothing on the heap (counted with a
//! counting global allocator; this test binary holds a single test so no
//! other thread allocates while it counts).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::sync::atomic::Ordering;

use flagmesh_engine::{CompiledFlag, FlagDefinition, Reason, Strictness};
use serde_json::{Map, json};

use flagmesh_test_support::counting::{ALLOCATIONS, Counting};

#[global_allocator]
static GLOBAL: Counting = Counting;

fn flag(raw: serde_json::Value) -> CompiledFlag {
    let def = FlagDefinition::from_json("f", &raw, &Map::new(), Strictness::Strict).unwrap();
    CompiledFlag::new("f", def, &Map::new())
}

#[test]
fn static_and_simple_targeting_resolutions_do_not_allocate() {
    let static_flag = flag(
        json!({"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "on"}),
    );
    let targeted = flag(
        json!({"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
        "targeting": {"if": [{"and": [{"==": [{"var": "country"}, "NL"]}, {">=": [{"var": "age"}, 21]},
                                      {"in": [{"var": "plan"}, ["pro", "team"]]}]}, "on", "off"]}}),
    );
    let ctx = json!({"targetingKey": "u-1", "country": "NL", "age": 30, "plan": "pro"});

    let before = ALLOCATIONS.load(Ordering::SeqCst);
    for _ in 0..1000 {
        let r = static_flag.resolve(black_box(&ctx));
        assert_eq!(r.reason, Reason::Static);
        let r = targeted.resolve(black_box(&ctx));
        assert_eq!(r.variant, Some("on"));
    }
    let after = ALLOCATIONS.load(Ordering::SeqCst);
    assert_eq!(
        after - before,
        0,
        "resolutions allocated {} times",
        after - before
    );
}
