//! Bootstrap payloads: every flag of a set evaluated for one context, as a
//! JSON object a page can embed so a browser starts with flag values and no
//! round trip.

use flagmesh_proto::convert::{struct_to_map, value_to_json};
use serde_json::{Map, Value, json};

use crate::remote::{RemoteClient, RemoteError, reason_name};

/// `{"flags": {key: {"value", "variant", "reason"}}, "revision", "stale"}`
/// for every flag that resolves to a value (flags whose caller default
/// applies are left out: the page keeps its own defaults for them).
pub async fn bootstrap(client: &RemoteClient, context: &Value) -> Result<Value, RemoteError> {
    let all = client.evaluate_all(context).await?;
    let mut flags = Map::new();
    for f in &all.flags {
        if let Some(v) = &f.value {
            flags.insert(
                f.flag_key.clone(),
                json!({"value": value_to_json(v), "variant": f.variant, "reason": reason_name(f.reason)}),
            );
        }
    }
    Ok(json!({
        "flags": flags,
        "metadata": all.metadata.as_ref().map(struct_to_map).unwrap_or_default(),
        "revision": all.revision,
        "stale": all.stale,
    }))
}

/// The payload as a `<script>` tag assigning `window.__FLAGS__`, with `<`
/// escaped so flag values cannot close the tag.
pub fn script_tag(payload: &Value) -> String {
    let json = payload.to_string().replace('<', "\\u003c");
    format!("<script>window.__FLAGS__ = {json};</script>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_tag_escapes_markup() {
        let tag = script_tag(&json!({"flags": {"x": {"value": "</script><b>"}}}));
        assert!(!tag[8..tag.len() - 9].contains('<'), "{tag}");
    }
}
