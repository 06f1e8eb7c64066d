//! Compiles a targeting rule (JsonLogic plus flagd's `fractional`, `sem_ver`,
//! `starts_with` and `ends_with`) once into a tree of typed nodes, so an
//! evaluation never re-parses JSON: variable paths are pre-split, operator
//! names are resolved to enum variants, and literal arguments of the flagd
//! operators (semver operators and versions, bucket weights) are pre-parsed.
//!
//! Two strictnesses: [`Strictness::Strict`] rejects what the flagd JSON
//! Schema rejects, with the path of the offending node (the control plane
//! reports it as warnings, or refuses on a strict request);
//! [`Strictness::Lenient`] accepts what a flagd evaluator loads and lets
//! misused flagd operators evaluate to `null` at run time, as flagd does.
//! A rule with an unknown operator or a dangling `$ref` does not compile in
//! either: the flag then resolves to `PARSE_ERROR`, as in flagd.

use serde_json::{Map, Value};

use crate::error::CompileError;
use crate::ops::fractional::{Bucket, Fractional, Weight};
use crate::ops::semver::{SemVerOp, SemVerRule, parse_version};

/// Deepest nesting of operators a rule may have; deeper rules are rejected
/// when compiled, so evaluation can never exhaust the stack.
pub const MAX_RULE_DEPTH: usize = 64;

/// How strictly a rule is checked when compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strictness {
    /// Reject everything the flagd schema rejects (control-plane validation).
    Strict,
    /// Accept what a flagd evaluator loads; misused flagd operators yield `null`.
    Lenient,
}

/// A compiled targeting rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub(crate) root: Node,
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CmpOp {
    Lt,
    Le,
    Gt,
    Ge,
}

/// An arithmetic operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
    Min,
    Max,
}

/// An operator over the elements of an array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IterOp {
    Map,
    Filter,
    All,
    None,
    Some,
}

/// One segment of a variable path; `index` is set when the segment is a
/// number, for stepping into arrays.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Segment {
    pub key: Box<str>,
    pub index: Option<usize>,
}

/// A compiled node.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    /// A literal value (also a literal array whose elements are all literals).
    Lit(Value),
    /// An array whose elements are rules, evaluated elementwise.
    Array(Box<[Node]>),
    /// A context variable at a fixed path (empty path: the whole data).
    Var {
        path: Box<[Segment]>,
        default: Option<Box<Node>>,
    },
    /// A context variable whose path is computed.
    VarDyn {
        path: Box<Node>,
        default: Option<Box<Node>>,
    },
    /// `$flagd.flagKey`.
    FlagKey,
    /// `$flagd.timestamp` (Unix seconds).
    Timestamp,
    /// `$flagd` itself: `{flagKey, timestamp}`.
    FlagdObject,
    Missing(Box<[Node]>),
    MissingSome(Box<Node>, Box<Node>),
    If(Box<[Node]>),
    Eq(Box<Node>, Box<Node>),
    NotEq(Box<Node>, Box<Node>),
    StrictEq(Box<Node>, Box<Node>),
    StrictNotEq(Box<Node>, Box<Node>),
    Not(Box<Node>),
    Truthy(Box<Node>),
    Or(Box<[Node]>),
    And(Box<[Node]>),
    Compare(CmpOp, Box<[Node]>),
    Arith(ArithOp, Box<[Node]>),
    In(Box<Node>, Box<Node>),
    Cat(Box<[Node]>),
    Substr(Box<[Node]>),
    Merge(Box<[Node]>),
    Iter(IterOp, Box<Node>, Box<Node>),
    Reduce(Box<Node>, Box<Node>, Box<Node>),
    StartsWith(Box<Node>, Box<Node>),
    EndsWith(Box<Node>, Box<Node>),
    SemVer(Box<SemVerRule>),
    Fractional(Box<Fractional>),
    /// A flagd operator used wrongly (lenient only): evaluates to `null`.
    Null,
}

/// Compiles a rule. `$ref`s must already be inlined ([`inline_refs`]).
pub fn compile(rule: &Value, strictness: Strictness) -> Result<Rule, CompileError> {
    let mut c = Compiler { strictness };
    let root = c.node(rule, "", 0)?;
    Ok(Rule { root })
}

fn too_deep(path: &str) -> CompileError {
    CompileError::new(path, format!("nests deeper than {MAX_RULE_DEPTH} levels"))
}

/// Refuses a rule nested deeper than [`MAX_RULE_DEPTH`], counting levels
/// of operators and arrays as [`compile`] does, without compiling it: the
/// depth limit keeps evaluation off the end of the stack, so it holds in
/// both strictnesses, whatever else a lenient load lets through.
pub fn check_depth(rule: &Value) -> Result<(), CompileError> {
    fn walk(v: &Value, path: &str, depth: usize) -> Result<(), CompileError> {
        // what nests is objects and arrays; a literal ends the walk
        if !(v.is_object() || v.is_array()) {
            return Ok(());
        }
        if depth > MAX_RULE_DEPTH {
            return Err(too_deep(path));
        }
        match v {
            Value::Object(obj) => {
                for (op, args) in obj {
                    let p = format!("{path}/{}", crate::definition::escape_pointer(op));
                    match args {
                        Value::Array(items) => {
                            for (i, item) in items.iter().enumerate() {
                                walk(item, &format!("{p}/{i}"), depth + 1)?;
                            }
                        }
                        single => walk(single, &p, depth + 1)?,
                    }
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(item, &format!("{path}/{i}"), depth + 1)?;
                }
            }
            _ => {}
        }
        Ok(())
    }
    walk(rule, "", 0)
}

/// Replaces every `{"$ref": "name"}` with the named shared rule of
/// `evaluators` (itself inlined). A `$ref` to an unknown evaluator is an
/// error in strict mode and is left in place in lenient mode (the rule then
/// fails to compile, and the flag resolves with `PARSE_ERROR`).
pub fn inline_refs(
    rule: &Value,
    evaluators: &Map<String, Value>,
    strictness: Strictness,
) -> Result<Value, CompileError> {
    let mut stack = Vec::new();
    inline(rule, evaluators, strictness, "", 0, &mut stack)
}

fn inline(
    rule: &Value,
    evaluators: &Map<String, Value>,
    strictness: Strictness,
    path: &str,
    depth: usize,
    stack: &mut Vec<String>,
) -> Result<Value, CompileError> {
    if depth > MAX_RULE_DEPTH * 2 {
        return Err(CompileError::new(
            path,
            format!("nests deeper than {MAX_RULE_DEPTH} levels"),
        ));
    }
    match rule {
        Value::Object(obj) => {
            if obj.len() == 1
                && let Some(target) = obj.get("$ref")
            {
                let Value::String(name) = target else {
                    return Err(CompileError::new(
                        path,
                        "\"$ref\" must name an evaluator (a string)",
                    ));
                };
                let Some(shared) = evaluators.get(name) else {
                    return match strictness {
                        Strictness::Strict => Err(CompileError::new(
                            path,
                            format!("\"$ref\" names \"{name}\", which is not in $evaluators"),
                        )),
                        Strictness::Lenient => Ok(rule.clone()),
                    };
                };
                if stack.iter().any(|s| s == name) {
                    return Err(CompileError::new(
                        path,
                        format!("\"$ref\" to \"{name}\" refers back to itself"),
                    ));
                }
                stack.push(name.clone());
                let out = inline(shared, evaluators, strictness, path, depth + 1, stack);
                stack.pop();
                return out;
            }
            let mut out = Map::new();
            for (k, v) in obj {
                let p = format!("{path}/{}", crate::definition::escape_pointer(k));
                out.insert(
                    k.clone(),
                    inline(v, evaluators, strictness, &p, depth + 1, stack)?,
                );
            }
            Ok(Value::Object(out))
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                inline(
                    v,
                    evaluators,
                    strictness,
                    &format!("{path}/{i}"),
                    depth + 1,
                    stack,
                )
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        other => Ok(other.clone()),
    }
}

struct Compiler {
    strictness: Strictness,
}

impl Compiler {
    fn strict(&self) -> bool {
        self.strictness == Strictness::Strict
    }

    fn node(&mut self, v: &Value, path: &str, depth: usize) -> Result<Node, CompileError> {
        if depth > MAX_RULE_DEPTH {
            return Err(too_deep(path));
        }
        match v {
            Value::Object(obj) => {
                let mut entries = obj.iter();
                let (Some((op, args)), None) = (entries.next(), entries.next()) else {
                    return Err(CompileError::new(
                        path,
                        format!(
                            "a rule object must hold exactly one operator, found {} keys",
                            obj.len()
                        ),
                    ));
                };
                let p = format!("{path}/{}", crate::definition::escape_pointer(op));
                self.operation(op, args, &p, depth + 1)
            }
            Value::Array(items) => {
                let nodes = self.list(items, path, depth + 1)?;
                if nodes.iter().all(|n| matches!(n, Node::Lit(_))) {
                    Ok(Node::Lit(v.clone()))
                } else {
                    Ok(Node::Array(nodes))
                }
            }
            other => Ok(Node::Lit(other.clone())),
        }
    }

    fn list(
        &mut self,
        items: &[Value],
        path: &str,
        depth: usize,
    ) -> Result<Box<[Node]>, CompileError> {
        items
            .iter()
            .enumerate()
            .map(|(i, item)| self.node(item, &format!("{path}/{i}"), depth))
            .collect()
    }

    /// The arguments of an operator: an array, or one value standing for a
    /// one-element array (JsonLogic's shorthand).
    fn args(args: &Value) -> &[Value] {
        match args {
            Value::Array(items) => items,
            single => std::slice::from_ref(single),
        }
    }

    fn arity(
        path: &str,
        op: &str,
        args: &[Value],
        min: usize,
        max: usize,
    ) -> Result<(), CompileError> {
        if args.len() < min || args.len() > max {
            let want = if min == max {
                format!("{min}")
            } else if max == usize::MAX {
                format!("at least {min}")
            } else {
                format!("{min} to {max}")
            };
            return Err(CompileError::new(
                path,
                format!("\"{op}\" takes {want} arguments, found {}", args.len()),
            ));
        }
        Ok(())
    }

    fn pair(
        &mut self,
        op: &str,
        raw: &Value,
        path: &str,
        depth: usize,
    ) -> Result<(Box<Node>, Box<Node>), CompileError> {
        let args = Self::args(raw);
        Self::arity(path, op, args, 2, 2)?;
        Ok((
            Box::new(self.node(&args[0], &format!("{path}/0"), depth)?),
            Box::new(self.node(&args[1], &format!("{path}/1"), depth)?),
        ))
    }

    fn operation(
        &mut self,
        op: &str,
        raw: &Value,
        path: &str,
        depth: usize,
    ) -> Result<Node, CompileError> {
        let args = Self::args(raw);
        let node = match op {
            "var" => self.var(raw, path, depth)?,
            "missing" => Node::Missing(self.list(args, path, depth)?),
            "missing_some" => {
                let (a, b) = self.pair(op, raw, path, depth)?;
                Node::MissingSome(a, b)
            }
            "if" | "?:" => Node::If(self.list(args, path, depth)?),
            "==" | "!=" | "===" | "!==" => {
                let (a, b) = self.pair(op, raw, path, depth)?;
                match op {
                    "==" => Node::Eq(a, b),
                    "!=" => Node::NotEq(a, b),
                    "===" => Node::StrictEq(a, b),
                    _ => Node::StrictNotEq(a, b),
                }
            }
            "!" | "!!" => {
                Self::arity(path, op, args, 1, 1)?;
                let inner = Box::new(self.node(&args[0], &format!("{path}/0"), depth)?);
                if op == "!" {
                    Node::Not(inner)
                } else {
                    Node::Truthy(inner)
                }
            }
            "or" => Node::Or(self.list(args, path, depth)?),
            "and" => Node::And(self.list(args, path, depth)?),
            "<" | "<=" | ">" | ">=" => {
                let max = if matches!(op, "<" | "<=") { 3 } else { 2 };
                Self::arity(path, op, args, 2, max)?;
                let cmp = match op {
                    "<" => CmpOp::Lt,
                    "<=" => CmpOp::Le,
                    ">" => CmpOp::Gt,
                    _ => CmpOp::Ge,
                };
                Node::Compare(cmp, self.list(args, path, depth)?)
            }
            "+" | "-" | "*" | "/" | "%" | "min" | "max" => {
                let arith = match op {
                    "+" => ArithOp::Add,
                    "-" => ArithOp::Sub,
                    "*" => ArithOp::Mul,
                    "/" => ArithOp::Div,
                    "%" => ArithOp::Mod,
                    "min" => ArithOp::Min,
                    _ => ArithOp::Max,
                };
                match arith {
                    ArithOp::Div | ArithOp::Mod => Self::arity(path, op, args, 2, 2)?,
                    ArithOp::Sub => Self::arity(path, op, args, 1, 2)?,
                    _ => {}
                }
                Node::Arith(arith, self.list(args, path, depth)?)
            }
            "in" => {
                let (a, b) = self.pair(op, raw, path, depth)?;
                Node::In(a, b)
            }
            "cat" => Node::Cat(self.list(args, path, depth)?),
            "substr" => {
                Self::arity(path, op, args, 2, 3)?;
                Node::Substr(self.list(args, path, depth)?)
            }
            "merge" => Node::Merge(self.list(args, path, depth)?),
            "map" | "filter" | "all" | "none" | "some" => {
                let (a, b) = self.pair(op, raw, path, depth)?;
                let iter = match op {
                    "map" => IterOp::Map,
                    "filter" => IterOp::Filter,
                    "all" => IterOp::All,
                    "none" => IterOp::None,
                    _ => IterOp::Some,
                };
                Node::Iter(iter, a, b)
            }
            "reduce" => {
                Self::arity(path, op, args, 3, 3)?;
                let l = self.list(args, path, depth)?;
                let mut it = l.into_vec().into_iter();
                match (it.next(), it.next(), it.next()) {
                    (Some(a), Some(b), Some(c)) => {
                        Node::Reduce(Box::new(a), Box::new(b), Box::new(c))
                    }
                    _ => return Err(CompileError::new(path, "\"reduce\" takes 3 arguments")),
                }
            }
            "log" => {
                Self::arity(path, op, args, 1, 1)?;
                self.node(&args[0], &format!("{path}/0"), depth)?
            }
            "starts_with" | "ends_with" => self.string_compare(op, args, path, depth)?,
            "sem_ver" => self.sem_ver(args, path, depth)?,
            "fractional" => self.fractional(args, path, depth)?,
            "$ref" => {
                return Err(CompileError::new(
                    path,
                    format!("\"$ref\" names {raw}, which is not in $evaluators"),
                ));
            }
            other => {
                return Err(CompileError::new(
                    path,
                    format!("unknown operator \"{other}\""),
                ));
            }
        };
        Ok(node)
    }

    fn var(&mut self, raw: &Value, path: &str, depth: usize) -> Result<Node, CompileError> {
        let (name, default) = match raw {
            Value::Array(items) => {
                Self::arity(path, "var", items, 0, 2)?;
                let default = match items.get(1) {
                    Some(d) => Some(Box::new(self.node(d, &format!("{path}/1"), depth)?)),
                    None => None,
                };
                (items.first().cloned().unwrap_or(Value::Null), default)
            }
            other => (other.clone(), None),
        };
        let text = match &name {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Null => String::new(),
            Value::Object(_) => {
                let dyn_path = Box::new(self.node(&name, &format!("{path}/0"), depth)?);
                return Ok(Node::VarDyn {
                    path: dyn_path,
                    default,
                });
            }
            other => {
                return Err(CompileError::new(
                    path,
                    format!("\"var\" takes a path (a string or number), found {other}"),
                ));
            }
        };
        if text == "$flagd" {
            return Ok(Node::FlagdObject);
        }
        if let Some(prop) = text.strip_prefix("$flagd.") {
            return match prop {
                "flagKey" => Ok(Node::FlagKey),
                "timestamp" => Ok(Node::Timestamp),
                _ if self.strict() => Err(CompileError::new(
                    path,
                    format!("\"$flagd.{prop}\" is not a flagd property (flagKey or timestamp)"),
                )),
                _ => Ok(Node::Null),
            };
        }
        Ok(Node::Var {
            path: split_path(&text),
            default,
        })
    }

    fn string_compare(
        &mut self,
        op: &str,
        args: &[Value],
        path: &str,
        depth: usize,
    ) -> Result<Node, CompileError> {
        if args.len() != 2 {
            if self.strict() {
                Self::arity(path, op, args, 2, 2)?;
            }
            return Ok(Node::Null);
        }
        for (i, a) in args.iter().enumerate() {
            if !matches!(a, Value::String(_) | Value::Object(_)) {
                if self.strict() {
                    return Err(CompileError::new(
                        &format!("{path}/{i}"),
                        format!(
                            "\"{op}\" compares strings: each argument must be a string or a rule, found {a}"
                        ),
                    ));
                }
                return Ok(Node::Null);
            }
        }
        let (a, b) = self.pair(op, &Value::Array(args.to_vec()), path, depth)?;
        Ok(if op == "starts_with" {
            Node::StartsWith(a, b)
        } else {
            Node::EndsWith(a, b)
        })
    }

    fn sem_ver(&mut self, args: &[Value], path: &str, depth: usize) -> Result<Node, CompileError> {
        if args.len() != 3 {
            if self.strict() {
                Self::arity(path, "sem_ver", args, 3, 3)?;
            }
            return Ok(Node::Null);
        }
        let subject = self.node(&args[0], &format!("{path}/0"), depth)?;
        let op = match &args[1] {
            Value::String(s) => match SemVerOp::parse(s) {
                Some(op) => Some(op),
                None if self.strict() => {
                    return Err(CompileError::new(
                        &format!("{path}/1"),
                        format!("\"{s}\" is not a sem_ver operator (=, !=, <, <=, >, >=, ^, ~)"),
                    ));
                }
                None => return Ok(Node::Null),
            },
            _ => None,
        };
        let version = match &args[2] {
            Value::String(_) | Value::Number(_) => match parse_version(&args[2]) {
                Some(v) => Some(v),
                None if self.strict() => {
                    return Err(CompileError::new(
                        &format!("{path}/2"),
                        format!("{} is not a semantic version", args[2]),
                    ));
                }
                None => return Ok(Node::Null),
            },
            _ => None,
        };
        let op_node = match op {
            Some(_) => None,
            None => Some(self.node(&args[1], &format!("{path}/1"), depth)?),
        };
        let version_node = match version {
            Some(_) => None,
            None => Some(self.node(&args[2], &format!("{path}/2"), depth)?),
        };
        Ok(Node::SemVer(Box::new(SemVerRule {
            subject,
            op,
            op_node,
            version,
            version_node,
        })))
    }

    fn fractional(
        &mut self,
        args: &[Value],
        path: &str,
        depth: usize,
    ) -> Result<Node, CompileError> {
        let (bucket_by, bucket_args, first) = match args.first() {
            Some(Value::Array(_)) => (None, args, 0),
            Some(Value::Object(_)) => (
                Some(self.node(&args[0], &format!("{path}/0"), depth)?),
                &args[1..],
                1,
            ),
            Some(other) if self.strict() => {
                return Err(CompileError::new(
                    &format!("{path}/0"),
                    format!(
                        "the bucketing value must be a rule (for example {{\"var\": \"email\"}}) or the first bucket, found {other}"
                    ),
                ));
            }
            Some(_) => (
                Some(self.node(&args[0], &format!("{path}/0"), depth)?),
                &args[1..],
                1,
            ),
            None => (None, args, 0),
        };
        if bucket_args.is_empty() {
            if self.strict() {
                return Err(CompileError::new(
                    path,
                    "\"fractional\" needs at least one bucket",
                ));
            }
            return Ok(Node::Null);
        }
        let mut buckets = Vec::with_capacity(bucket_args.len());
        for (i, b) in bucket_args.iter().enumerate() {
            let bpath = format!("{path}/{}", i + first);
            match self.bucket(b, &bpath, depth)? {
                Some(bucket) => buckets.push(bucket),
                None => return Ok(Node::Null),
            }
        }
        Ok(Node::Fractional(Box::new(Fractional::new(
            bucket_by, buckets,
        ))))
    }

    /// One `[variant, weight]` bucket; `None` (lenient only) when malformed.
    fn bucket(
        &mut self,
        raw: &Value,
        path: &str,
        depth: usize,
    ) -> Result<Option<Bucket>, CompileError> {
        let malformed = |msg: String| -> Result<Option<Bucket>, CompileError> {
            Err(CompileError::new(path, msg))
        };
        let Value::Array(parts) = raw else {
            if self.strict() {
                return malformed(format!("a bucket must be [variant, weight], found {raw}"));
            }
            return Ok(None);
        };
        if parts.is_empty() || parts.len() > 2 {
            if self.strict() {
                return malformed(format!(
                    "a bucket must be [variant] or [variant, weight], found {} items",
                    parts.len()
                ));
            }
            return Ok(None);
        }
        let variant = match &parts[0] {
            Value::Null | Value::Array(_) => {
                if self.strict() {
                    return Err(CompileError::new(
                        &format!("{path}/0"),
                        format!(
                            "a bucket's variant must be a string or a rule, found {}",
                            parts[0]
                        ),
                    ));
                }
                return Ok(None);
            }
            v => self.node(v, &format!("{path}/0"), depth)?,
        };
        let weight = match parts.get(1) {
            None => Weight::Fixed(1),
            Some(Value::Number(n)) => Weight::Fixed(clamp_weight(n.as_f64().unwrap_or(0.0))),
            Some(w @ Value::Object(_)) => Weight::Dyn(self.node(w, &format!("{path}/1"), depth)?),
            Some(other) => {
                if self.strict() {
                    return Err(CompileError::new(
                        &format!("{path}/1"),
                        format!("a bucket's weight must be a number, found {other}"),
                    ));
                }
                return Ok(None);
            }
        };
        Ok(Some(Bucket { variant, weight }))
    }
}

/// A weight as an integer: fractions are truncated, negatives clamp to 0.
pub(crate) fn clamp_weight(w: f64) -> u64 {
    if w.is_finite() && w > 0.0 {
        // Truncation toward zero is the intended rounding of weights.
        w.min(u32::MAX as f64) as u64
    } else {
        0
    }
}

/// Splits a dotted variable path into segments.
pub(crate) fn split_path(path: &str) -> Box<[Segment]> {
    if path.is_empty() {
        return Box::new([]);
    }
    path.split('.')
        .map(|s| Segment {
            key: s.into(),
            index: s.parse().ok(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn strict(v: Value) -> Result<Rule, CompileError> {
        compile(&v, Strictness::Strict)
    }

    #[test]
    fn rejects_unknown_operators_with_their_path() {
        let e = strict(json!({"if": [{"nope": [1]}, "a", "b"]})).err();
        assert_eq!(e.map(|e| e.path), Some("/if/0/nope".to_owned()));
    }

    #[test]
    fn strict_rejects_bad_semver_operator_and_lenient_accepts() {
        let rule = json!({"sem_ver": [{"var": "v"}, "*", "1.0.0"]});
        assert!(strict(rule.clone()).is_err());
        assert!(compile(&rule, Strictness::Lenient).is_ok());
    }

    #[test]
    fn rejects_rules_nested_too_deep() {
        let mut rule = json!({"var": "x"});
        for _ in 0..(MAX_RULE_DEPTH + 5) {
            rule = json!({"!": [rule]});
        }
        let e = strict(rule).err().map(|e| e.message);
        assert!(e.is_some_and(|m| m.contains("deeper")));
    }

    #[test]
    fn the_depth_check_draws_the_line_where_compiling_does() {
        // operators with array arguments, operators with a single one, and
        // literal arrays, each just inside and just past the limit
        let shapes: [fn(Value) -> Value; 3] = [
            |r| json!({"!": [r]}),
            |r| json!({"!": r}),
            |r| json!({"in": [1, [r]]}),
        ];
        for wrap in shapes {
            let mut rule = json!({"var": "x"});
            let mut levels = 0;
            loop {
                let compiled = compile(&rule, Strictness::Lenient);
                let deep = compiled
                    .as_ref()
                    .err()
                    .is_some_and(|e| e.message.contains("deeper"));
                assert_eq!(
                    check_depth(&rule).is_err(),
                    deep,
                    "at {levels} levels: {compiled:?}"
                );
                if deep || levels > 2 * MAX_RULE_DEPTH {
                    break;
                }
                rule = wrap(rule);
                levels += 1;
            }
            assert!(check_depth(&rule).is_err(), "never too deep");
        }
    }

    #[test]
    fn inlines_refs_and_detects_cycles() {
        let mut ev = Map::new();
        ev.insert("a".into(), json!({"$ref": "b"}));
        ev.insert("b".into(), json!({"==": [1, 1]}));
        let out = inline_refs(
            &json!({"if": [{"$ref": "a"}, "x"]}),
            &ev,
            Strictness::Strict,
        );
        assert_eq!(out.ok(), Some(json!({"if": [{"==": [1, 1]}, "x"]})));
        ev.insert("b".into(), json!({"$ref": "a"}));
        assert!(inline_refs(&json!({"$ref": "a"}), &ev, Strictness::Strict).is_err());
    }
}
