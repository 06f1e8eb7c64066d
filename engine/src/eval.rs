//! Evaluation of compiled rules with JsonLogic's semantics (JavaScript-style
//! truthiness, loose equality and number coercion).
//!
//! Results are `Cow`s that borrow from the rule's literals or from the
//! context whenever they can, so the common paths (variable lookup,
//! comparison, `if` returning a literal variant name) allocate nothing.

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Number, Value};

use crate::rule::{ArithOp, CmpOp, IterOp, Node, Rule, Segment};

/// What an evaluation sees besides its data.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Env<'a> {
    /// The key of the flag being evaluated (`$flagd.flagKey`).
    pub flag_key: &'a str,
    /// The whole evaluation context (for `targetingKey`, also inside `map`).
    pub root: &'a Value,
}

impl Rule {
    /// Evaluates the rule against a context (a JSON object) for the flag
    /// whose key is `flag_key` (`$flagd.flagKey`).
    pub fn evaluate<'a>(&'a self, context: &'a Value, flag_key: &'a str) -> Cow<'a, Value> {
        let env = Env {
            flag_key,
            root: context,
        };
        self.root.eval(context, &env)
    }
}

fn owned<'a>(v: Value) -> Cow<'a, Value> {
    Cow::Owned(v)
}

fn boolean<'a>(b: bool) -> Cow<'a, Value> {
    Cow::Owned(Value::Bool(b))
}

impl Node {
    pub(crate) fn eval<'a>(&'a self, data: &'a Value, env: &Env<'a>) -> Cow<'a, Value> {
        match self {
            Node::Lit(v) => Cow::Borrowed(v),
            Node::Null => owned(Value::Null),
            Node::Array(items) => owned(Value::Array(
                items
                    .iter()
                    .map(|n| n.eval(data, env).into_owned())
                    .collect(),
            )),
            Node::Var { path, default } => match lookup(data, path) {
                Some(v) => Cow::Borrowed(v),
                None => match default {
                    Some(d) => d.eval(data, env),
                    None => owned(Value::Null),
                },
            },
            Node::VarDyn { path, default } => {
                let p = self::to_string(&path.eval(data, env)).into_owned();
                let segments = crate::rule::split_path(&p);
                match lookup(data, &segments) {
                    Some(v) => Cow::Borrowed(v),
                    None => match default {
                        Some(d) => d.eval(data, env),
                        None => owned(Value::Null),
                    },
                }
            }
            // made for the rare rule that reads the key as a value; `cat`
            // and `fractional` read it without a copy
            Node::FlagKey => owned(Value::String(env.flag_key.to_owned())),
            Node::Timestamp => owned(Value::from(unix_now())),
            Node::FlagdObject => {
                let mut m = Map::new();
                m.insert("flagKey".into(), Value::String(env.flag_key.to_owned()));
                m.insert("timestamp".into(), Value::from(unix_now()));
                owned(Value::Object(m))
            }
            Node::Missing(args) => owned(Value::Array(missing(args, data, env))),
            Node::MissingSome(min, keys) => {
                let need = to_number(&min.eval(data, env)).unwrap_or(0.0);
                let keys = keys.eval(data, env);
                let list: &[Value] = match keys.as_ref() {
                    Value::Array(a) => a,
                    _ => &[],
                };
                let absent: Vec<Value> = list
                    .iter()
                    .filter(|k| is_missing(data, &to_string(k)))
                    .cloned()
                    .collect();
                let present = (list.len() - absent.len()) as f64;
                if present >= need {
                    owned(Value::Array(Vec::new()))
                } else {
                    owned(Value::Array(absent))
                }
            }
            Node::If(args) => {
                let mut i = 0;
                while i + 1 < args.len() {
                    if truthy(&args[i].eval(data, env)) {
                        return args[i + 1].eval(data, env);
                    }
                    i += 2;
                }
                match args.get(i) {
                    Some(last) if args.len() % 2 == 1 => last.eval(data, env),
                    _ => owned(Value::Null),
                }
            }
            Node::Eq(a, b) => boolean(loose_eq(&a.eval(data, env), &b.eval(data, env))),
            Node::NotEq(a, b) => boolean(!loose_eq(&a.eval(data, env), &b.eval(data, env))),
            Node::StrictEq(a, b) => boolean(strict_eq(&a.eval(data, env), &b.eval(data, env))),
            Node::StrictNotEq(a, b) => boolean(!strict_eq(&a.eval(data, env), &b.eval(data, env))),
            Node::Not(a) => boolean(!truthy(&a.eval(data, env))),
            Node::Truthy(a) => boolean(truthy(&a.eval(data, env))),
            Node::Or(args) => {
                let mut last = owned(Value::Null);
                for a in args.iter() {
                    last = a.eval(data, env);
                    if truthy(&last) {
                        return last;
                    }
                }
                last
            }
            Node::And(args) => {
                let mut last = owned(Value::Null);
                for a in args.iter() {
                    last = a.eval(data, env);
                    if !truthy(&last) {
                        return last;
                    }
                }
                last
            }
            Node::Compare(op, args) => {
                let a = args[0].eval(data, env);
                let b = args[1].eval(data, env);
                if !compare(*op, &a, &b) {
                    return boolean(false);
                }
                match args.get(2) {
                    Some(c) => boolean(compare(*op, &b, &c.eval(data, env))),
                    None => boolean(true),
                }
            }
            Node::Arith(op, args) => arith(*op, args, data, env),
            Node::In(needle, haystack) => {
                let needle = needle.eval(data, env);
                let haystack = haystack.eval(data, env);
                boolean(match haystack.as_ref() {
                    Value::String(h) => h.contains(to_string(&needle).as_ref()),
                    Value::Array(items) => items.iter().any(|i| strict_eq(i, &needle)),
                    _ => false,
                })
            }
            Node::Cat(args) => {
                let mut out = String::with_capacity(64);
                for a in args.iter() {
                    match a {
                        Node::FlagKey => out.push_str(env.flag_key),
                        a => out.push_str(&to_string(&a.eval(data, env))),
                    }
                }
                owned(Value::String(out))
            }
            Node::Substr(args) => substr(args, data, env),
            Node::Merge(args) => {
                let mut out = Vec::new();
                for a in args.iter() {
                    match a.eval(data, env).into_owned() {
                        Value::Array(items) => out.extend(items),
                        other => out.push(other),
                    }
                }
                owned(Value::Array(out))
            }
            Node::Iter(op, source, body) => iterate(*op, source, body, data, env),
            Node::Reduce(source, body, init) => {
                let source = source.eval(data, env);
                let mut acc = init.eval(data, env).into_owned();
                if let Value::Array(items) = source.as_ref() {
                    for item in items {
                        let mut scope = Map::new();
                        scope.insert("current".into(), item.clone());
                        scope.insert("accumulator".into(), acc);
                        let scope = Value::Object(scope);
                        acc = body.eval(&scope, env).into_owned();
                    }
                }
                owned(acc)
            }
            Node::StartsWith(a, b) => string_test(a, b, data, env, |s, p| s.starts_with(p)),
            Node::EndsWith(a, b) => string_test(a, b, data, env, |s, p| s.ends_with(p)),
            Node::SemVer(rule) => rule.eval(data, env),
            Node::Fractional(f) => f.eval(data, env),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Follows a variable path into objects (by key) and arrays (by index).
fn lookup<'a>(data: &'a Value, path: &[Segment]) -> Option<&'a Value> {
    let mut cur = data;
    for seg in path {
        cur = match cur {
            Value::Object(m) => m.get(&*seg.key)?,
            Value::Array(a) => a.get(seg.index?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn is_missing(data: &Value, path: &str) -> bool {
    let segments = crate::rule::split_path(path);
    match lookup(data, &segments) {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(_) => false,
    }
}

fn missing(args: &[Node], data: &Value, env: &Env<'_>) -> Vec<Value> {
    let mut keys: Vec<Value> = Vec::new();
    for (i, a) in args.iter().enumerate() {
        match a.eval(data, env).into_owned() {
            Value::Array(items) if i == 0 => keys.extend(items),
            other => keys.push(other),
        }
    }
    keys.into_iter()
        .filter(|k| is_missing(data, &to_string(k)))
        .collect()
}

fn string_test<'a>(
    a: &'a Node,
    b: &'a Node,
    data: &'a Value,
    env: &Env<'a>,
    test: impl Fn(&str, &str) -> bool,
) -> Cow<'a, Value> {
    match (a.eval(data, env).as_ref(), b.eval(data, env).as_ref()) {
        (Value::String(s), Value::String(p)) => boolean(test(s, p)),
        _ => owned(Value::Null),
    }
}

/// JsonLogic truthiness: `false`, `null`, `0`, `NaN`, `""` and `[]` are false.
pub(crate) fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0 && !f.is_nan()),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(_) => true,
    }
}

/// JavaScript's ToNumber; `None` stands for NaN.
pub(crate) fn to_number(v: &Value) -> Option<f64> {
    match v {
        Value::Null => Some(0.0),
        Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
        Value::Number(n) => n.as_f64(),
        Value::String(s) => {
            let t = s.trim();
            if t.is_empty() {
                Some(0.0)
            } else {
                t.parse::<f64>().ok().filter(|f| !f.is_nan())
            }
        }
        Value::Array(a) => match a.as_slice() {
            [] => Some(0.0),
            [one] => to_number(one),
            _ => None,
        },
        Value::Object(_) => None,
    }
}

/// JavaScript's ToString for JSON values.
pub(crate) fn to_string(v: &Value) -> Cow<'_, str> {
    match v {
        Value::String(s) => Cow::Borrowed(s),
        Value::Null => Cow::Borrowed("null"),
        Value::Bool(true) => Cow::Borrowed("true"),
        Value::Bool(false) => Cow::Borrowed("false"),
        Value::Number(n) => Cow::Owned(number_to_string(n)),
        Value::Array(items) => Cow::Owned(
            items
                .iter()
                .map(|i| match i {
                    Value::Null => Cow::Borrowed(""),
                    other => to_string(other),
                })
                .collect::<Vec<_>>()
                .join(","),
        ),
        Value::Object(_) => Cow::Borrowed("[object Object]"),
    }
}

fn number_to_string(n: &Number) -> String {
    match n.as_f64() {
        Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 1e21 => format!("{f:.0}"),
        _ => n.to_string(),
    }
}

/// A number as a JSON value, integral when it is one.
pub(crate) fn number(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        // exact: |f| < 2^53
        Value::from(f as i64)
    } else {
        Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)
    }
}

/// JavaScript's `==` for JSON values.
pub(crate) fn loose_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Null, Value::Null) => true,
        (Value::Null, _) | (_, Value::Null) => false,
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        (Value::Number(_), Value::Number(_)) => a.as_f64() == b.as_f64(),
        (Value::Object(_), _) | (_, Value::Object(_)) => false,
        (Value::Array(_), Value::Array(_)) => false,
        (Value::Array(_), _) => loose_eq(&Value::String(to_string(a).into_owned()), b),
        (_, Value::Array(_)) => loose_eq(a, &Value::String(to_string(b).into_owned())),
        _ => match (to_number(a), to_number(b)) {
            (Some(x), Some(y)) => x == y,
            _ => false,
        },
    }
}

/// JavaScript's `===` for JSON values (arrays and objects never equal).
pub(crate) fn strict_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Null, Value::Null) => true,
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        (Value::Number(_), Value::Number(_)) => a.as_f64() == b.as_f64(),
        _ => false,
    }
}

fn compare(op: CmpOp, a: &Value, b: &Value) -> bool {
    if let (Value::String(x), Value::String(y)) = (a, b) {
        return match op {
            CmpOp::Lt => x < y,
            CmpOp::Le => x <= y,
            CmpOp::Gt => x > y,
            CmpOp::Ge => x >= y,
        };
    }
    match (to_number(a), to_number(b)) {
        (Some(x), Some(y)) => match op {
            CmpOp::Lt => x < y,
            CmpOp::Le => x <= y,
            CmpOp::Gt => x > y,
            CmpOp::Ge => x >= y,
        },
        _ => false,
    }
}

fn arith<'a>(op: ArithOp, args: &'a [Node], data: &'a Value, env: &Env<'a>) -> Cow<'a, Value> {
    let mut nums = Vec::with_capacity(args.len());
    for a in args {
        let v = a.eval(data, env);
        match v.as_ref() {
            // `+`, `*`, `min`, `max` spread arrays given as their one argument
            Value::Array(items)
                if args.len() == 1
                    && matches!(
                        op,
                        ArithOp::Add | ArithOp::Mul | ArithOp::Min | ArithOp::Max
                    ) =>
            {
                for i in items {
                    nums.push(to_number(i));
                }
            }
            other => nums.push(to_number(other)),
        }
    }
    let Some(nums) = nums.into_iter().collect::<Option<Vec<f64>>>() else {
        return owned(Value::Null);
    };
    let result = match op {
        ArithOp::Add => Some(nums.iter().sum()),
        ArithOp::Mul => nums.iter().copied().reduce(|a, b| a * b),
        ArithOp::Sub => match nums.as_slice() {
            [x] => Some(-x),
            [x, y] => Some(x - y),
            _ => None,
        },
        ArithOp::Div => match nums.as_slice() {
            [_, y] if *y == 0.0 => None,
            [x, y] => Some(x / y),
            _ => None,
        },
        ArithOp::Mod => match nums.as_slice() {
            [_, y] if *y == 0.0 => None,
            [x, y] => Some(x % y),
            _ => None,
        },
        ArithOp::Min => nums.iter().copied().reduce(f64::min),
        ArithOp::Max => nums.iter().copied().reduce(f64::max),
    };
    owned(result.map(number).unwrap_or(Value::Null))
}

fn substr<'a>(args: &'a [Node], data: &'a Value, env: &Env<'a>) -> Cow<'a, Value> {
    let source = args[0].eval(data, env);
    let text = to_string(&source);
    let chars: Vec<char> = text.chars().collect();
    let len = chars.len() as i64;
    let start = to_number(&args[1].eval(data, env)).unwrap_or(0.0) as i64;
    let start = if start < 0 {
        len.saturating_add(start).max(0)
    } else {
        start.min(len)
    };
    let end = match args.get(2) {
        Some(n) => {
            let count = to_number(&n.eval(data, env)).unwrap_or(0.0) as i64;
            if count < 0 {
                len.saturating_add(count).max(start)
            } else {
                start.saturating_add(count).min(len)
            }
        }
        None => len,
    };
    // start and end are clamped into 0..=len above
    let out: String = chars[start as usize..end.max(start) as usize]
        .iter()
        .collect();
    owned(Value::String(out))
}

fn iterate<'a>(
    op: IterOp,
    source: &'a Node,
    body: &'a Node,
    data: &'a Value,
    env: &Env<'a>,
) -> Cow<'a, Value> {
    let source = source.eval(data, env);
    let items: &[Value] = match source.as_ref() {
        Value::Array(a) => a,
        _ => &[],
    };
    let result = match op {
        IterOp::Map => Value::Array(
            items
                .iter()
                .map(|i| body.eval(i, env).into_owned())
                .collect(),
        ),
        IterOp::Filter => Value::Array(
            items
                .iter()
                .filter(|i| truthy(&body.eval(i, env)))
                .cloned()
                .collect(),
        ),
        IterOp::All => {
            Value::Bool(!items.is_empty() && items.iter().all(|i| truthy(&body.eval(i, env))))
        }
        IterOp::None => Value::Bool(!items.iter().any(|i| truthy(&body.eval(i, env)))),
        IterOp::Some => Value::Bool(items.iter().any(|i| truthy(&body.eval(i, env)))),
    };
    owned(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::{Strictness, compile};
    use serde_json::json;

    fn run(rule: Value, data: Value) -> Value {
        let r = compile(&rule, Strictness::Lenient).expect("rule compiles");
        r.evaluate(&data, "flag").into_owned()
    }

    #[test]
    fn jsonlogic_basics() {
        assert_eq!(run(json!({"==": [1, "1"]}), json!({})), json!(true));
        assert_eq!(run(json!({"===": [1, "1"]}), json!({})), json!(false));
        assert_eq!(
            run(json!({"<": [1, {"var": "x"}, 3]}), json!({"x": 2})),
            json!(true)
        );
        assert_eq!(
            run(json!({"in": ["b", ["a", "b"]]}), json!({})),
            json!(true)
        );
        assert_eq!(run(json!({"in": ["ell", "hello"]}), json!({})), json!(true));
        assert_eq!(
            run(json!({"cat": ["a", 1, 2.5, true]}), json!({})),
            json!("a12.5true")
        );
        assert_eq!(run(json!({"+": [1, "2", 3.5]}), json!({})), json!(6.5));
        assert_eq!(run(json!({"-": [5]}), json!({})), json!(-5));
        assert_eq!(run(json!({"/": [1, 0]}), json!({})), Value::Null);
        assert_eq!(run(json!({"%": [7, 3]}), json!({})), json!(1));
        assert_eq!(run(json!({"max": [1, 9, 3]}), json!({})), json!(9));
        assert_eq!(
            run(json!({"substr": ["jsonlogic", -5, 2]}), json!({})),
            json!("lo")
        );
        // lengths and starts beyond any string's, either way, clamp to it
        // (an overflow here once panicked, and wrapped to "" in release)
        for (start, count, out) in [
            (json!(2), json!(1e300), "onlogic"),
            (json!(2), json!(-1e300), ""),
            (json!(1e300), json!(1e300), ""),
            (json!(-1e300), json!(1e300), "jsonlogic"),
            (json!(-1e300), json!(-1e300), ""),
        ] {
            assert_eq!(
                run(json!({"substr": ["jsonlogic", start, count]}), json!({})),
                json!(out),
                "substr from {start} for {count}"
            );
        }
        assert_eq!(run(json!({"or": [0, "", "x"]}), json!({})), json!("x"));
        assert_eq!(run(json!({"and": [1, 0, 2]}), json!({})), json!(0));
        assert_eq!(run(json!({"!!": [[]]}), json!({})), json!(false));
        assert_eq!(
            run(json!({"var": "a.1.b"}), json!({"a": [0, {"b": 7}]})),
            json!(7)
        );
        assert_eq!(run(json!({"var": ["nope", 4]}), json!({})), json!(4));
        assert_eq!(
            run(json!({"missing": ["a", "b"]}), json!({"a": 1})),
            json!(["b"])
        );
        assert_eq!(
            run(json!({"missing_some": [1, ["a", "b"]]}), json!({"a": 1})),
            json!([])
        );
        assert_eq!(
            run(
                json!({"map": [{"var": "xs"}, {"*": [{"var": ""}, 2]}]}),
                json!({"xs": [1, 2]})
            ),
            json!([2, 4])
        );
        assert_eq!(
            run(
                json!({"reduce": [{"var": "xs"}, {"+": [{"var": "current"}, {"var": "accumulator"}]}, 0]}),
                json!({"xs": [1, 2, 3]})
            ),
            json!(6)
        );
        assert_eq!(
            run(json!({"all": [[1, 2], {">": [{"var": ""}, 0]}]}), json!({})),
            json!(true)
        );
        assert_eq!(
            run(json!({"merge": [[1], 2, [3]]}), json!({})),
            json!([1, 2, 3])
        );
        assert_eq!(
            run(json!({"if": [false, "a", false, "b", "c"]}), json!({})),
            json!("c")
        );
        assert_eq!(
            run(json!({"var": "$flagd.flagKey"}), json!({})),
            json!("flag")
        );
    }

    #[test]
    fn flagd_string_operators_return_null_on_non_strings() {
        assert_eq!(
            run(
                json!({"starts_with": [{"var": "id"}, "ab"]}),
                json!({"id": "abc"})
            ),
            json!(true)
        );
        assert_eq!(
            run(
                json!({"ends_with": [{"var": "id"}, "ab"]}),
                json!({"id": 5})
            ),
            Value::Null
        );
    }
}
