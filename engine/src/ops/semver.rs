//! `sem_ver`: compares a context value with a semantic version.
//!
//! Versions may carry a `v`/`V` prefix and may be partial (`1`, `1.2`, or a
//! JSON number such as `1.2`); missing parts are zero. Build metadata is
//! ignored; pre-releases order before their release. `^` matches the same
//! major version, `~` the same major and minor.

use std::borrow::Cow;
use std::cmp::Ordering;

use semver::Version;
use serde_json::Value;

use crate::eval::Env;
use crate::rule::Node;

/// A sem_ver comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SemVerOp {
    /// `=`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `^`: same major version.
    Caret,
    /// `~`: same major and minor version.
    Tilde,
}

impl SemVerOp {
    /// Parses an operator as flagd spells it.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "=" => Self::Eq,
            "!=" => Self::Ne,
            "<" => Self::Lt,
            "<=" => Self::Le,
            ">" => Self::Gt,
            ">=" => Self::Ge,
            "^" => Self::Caret,
            "~" => Self::Tilde,
            _ => return None,
        })
    }

    /// Whether `subject OP target` holds.
    pub fn holds(self, subject: &Version, target: &Version) -> bool {
        let ord = compare(subject, target);
        match self {
            Self::Eq => ord == Ordering::Equal,
            Self::Ne => ord != Ordering::Equal,
            Self::Lt => ord == Ordering::Less,
            Self::Le => ord != Ordering::Greater,
            Self::Gt => ord == Ordering::Greater,
            Self::Ge => ord != Ordering::Less,
            Self::Caret => subject.major == target.major,
            Self::Tilde => subject.major == target.major && subject.minor == target.minor,
        }
    }
}

/// Orders two versions ignoring build metadata.
fn compare(a: &Version, b: &Version) -> Ordering {
    (a.major, a.minor, a.patch)
        .cmp(&(b.major, b.minor, b.patch))
        .then_with(|| a.pre.cmp(&b.pre))
}

/// Parses a version from a string or a JSON number, accepting a `v` prefix
/// and partial versions.
pub fn parse_version(v: &Value) -> Option<Version> {
    let text: Cow<'_, str> = match v {
        Value::String(s) => Cow::Borrowed(s.as_str()),
        Value::Number(n) => Cow::Owned(n.to_string()),
        _ => return None,
    };
    let t = text.trim();
    let t = t.strip_prefix(['v', 'V']).unwrap_or(t);
    let core_end = t.find(['-', '+']).unwrap_or(t.len());
    let dots = t[..core_end].matches('.').count();
    let padded: Cow<'_, str> = match dots {
        0 => Cow::Owned(format!("{}.0.0{}", &t[..core_end], &t[core_end..])),
        1 => Cow::Owned(format!("{}.0{}", &t[..core_end], &t[core_end..])),
        2 => Cow::Borrowed(t),
        _ => return None,
    };
    Version::parse(&padded).ok()
}

/// A compiled `sem_ver` operation; operator and version are pre-parsed when
/// they are literals.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SemVerRule {
    pub subject: Node,
    pub op: Option<SemVerOp>,
    pub op_node: Option<Node>,
    pub version: Option<Version>,
    pub version_node: Option<Node>,
}

impl SemVerRule {
    pub(crate) fn eval<'a>(&'a self, data: &'a Value, env: &Env<'a>) -> Cow<'a, Value> {
        let subject = self.subject.eval(data, env);
        let Some(subject) = parse_version(&subject) else {
            return Cow::Owned(Value::Null);
        };
        let op = match (&self.op, &self.op_node) {
            (Some(op), _) => *op,
            (None, Some(node)) => match node.eval(data, env).as_ref() {
                Value::String(s) => match SemVerOp::parse(s) {
                    Some(op) => op,
                    None => return Cow::Owned(Value::Null),
                },
                _ => return Cow::Owned(Value::Null),
            },
            (None, None) => return Cow::Owned(Value::Null),
        };
        let computed;
        let target = match (&self.version, &self.version_node) {
            (Some(v), _) => v,
            (None, Some(node)) => match parse_version(&node.eval(data, env)) {
                Some(v) => {
                    computed = v;
                    &computed
                }
                None => return Cow::Owned(Value::Null),
            },
            (None, None) => return Cow::Owned(Value::Null),
        };
        Cow::Owned(Value::Bool(op.holds(&subject, target)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn v(s: &str) -> Version {
        parse_version(&json!(s)).unwrap_or_else(|| panic!("{s} did not parse"))
    }

    #[test]
    fn parses_partial_prefixed_and_numeric_versions() {
        assert_eq!(v("1"), Version::new(1, 0, 0));
        assert_eq!(v("v1.2"), Version::new(1, 2, 0));
        assert_eq!(parse_version(&json!(1.2)), Some(Version::new(1, 2, 0)));
        assert_eq!(parse_version(&json!("2.0.0.0")), None);
        assert_eq!(parse_version(&json!("not-a-version")), None);
    }

    #[test]
    fn operators_follow_semver_order_ignoring_build() {
        assert!(SemVerOp::Lt.holds(&v("2.0.0-alpha"), &v("2.0.0")));
        assert!(SemVerOp::Eq.holds(&v("1.0.0+a"), &v("1.0.0+b")));
        assert!(SemVerOp::Tilde.holds(&v("3.0.1"), &v("3.0.0")));
        assert!(!SemVerOp::Tilde.holds(&v("3.1.0"), &v("3.0.0")));
        assert!(SemVerOp::Caret.holds(&v("3.1.0"), &v("3.0.0")));
        assert!(SemVerOp::Ge.holds(&v("2.0.0"), &v("2.0.0")));
    }
}
