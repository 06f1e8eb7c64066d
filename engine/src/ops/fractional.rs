//! `fractional`: deterministic, weighted bucketing of a subject into one of
//! several variants (flagd's v2 bucketing).
//!
//! The bucketing string (by default `flagKey + targetingKey`) is hashed with
//! MurmurHash3 x86_32, seed 0; with `total` the sum of the integer weights,
//! the bucket is `(hash * total) >> 32` (in 128 bits), walked against the
//! cumulative weights. Weights default to 1, negative weights count as 0, and
//! a split whose weights are all 0 selects nothing (`null`).

use std::borrow::Cow;

use serde_json::Value;

use crate::eval::Env;
use crate::rule::{Node, clamp_weight};

/// A bucket's weight: fixed at compile time, or computed per evaluation.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Weight {
    Fixed(u64),
    Dyn(Node),
}

/// One `[variant, weight]` bucket.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Bucket {
    pub variant: Node,
    pub weight: Weight,
}

/// A compiled `fractional` operation.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Fractional {
    /// The bucketing value; `None` means `flagKey + targetingKey`.
    bucket_by: Option<Node>,
    buckets: Box<[Bucket]>,
    /// The cumulative weights when every weight is fixed.
    fixed_cumulative: Option<Box<[u64]>>,
}

impl Fractional {
    pub(crate) fn new(bucket_by: Option<Node>, buckets: Vec<Bucket>) -> Self {
        let fixed_cumulative = buckets
            .iter()
            .map(|b| match b.weight {
                Weight::Fixed(w) => Some(w),
                Weight::Dyn(_) => None,
            })
            .collect::<Option<Vec<u64>>>()
            .map(|ws| {
                ws.iter()
                    .scan(0u64, |acc, w| {
                        *acc += w;
                        Some(*acc)
                    })
                    .collect()
            });
        Self {
            bucket_by,
            buckets: buckets.into_boxed_slice(),
            fixed_cumulative,
        }
    }

    pub(crate) fn eval<'a>(&'a self, data: &'a Value, env: &Env<'a>) -> Cow<'a, Value> {
        let hash = match &self.bucket_by {
            Some(node) => match node.eval(data, env).as_ref() {
                Value::String(s) => murmur3(s.as_bytes()),
                _ => return Cow::Owned(Value::Null),
            },
            None => match env
                .root
                .get("targetingKey")
                .and_then(crate::context::targeting_key_text)
            {
                Some(tk) => {
                    let mut key = String::with_capacity(env.flag_key.len() + tk.len());
                    key.push_str(env.flag_key);
                    key.push_str(&tk);
                    murmur3(key.as_bytes())
                }
                None => return Cow::Owned(Value::Null),
            },
        };
        let index = match &self.fixed_cumulative {
            Some(cumulative) => pick(hash, cumulative),
            None => {
                let cumulative: Vec<u64> = self
                    .buckets
                    .iter()
                    .scan(0u64, |acc, b| {
                        *acc += match &b.weight {
                            Weight::Fixed(w) => *w,
                            Weight::Dyn(node) => match node.eval(data, env).as_ref() {
                                Value::Number(n) => clamp_weight(n.as_f64().unwrap_or(0.0)),
                                _ => 0,
                            },
                        };
                        Some(*acc)
                    })
                    .collect();
                pick(hash, &cumulative)
            }
        };
        match index {
            Some(i) => self.buckets[i].variant.eval(data, env),
            None => Cow::Owned(Value::Null),
        }
    }
}

/// MurmurHash3 x86_32 with seed 0, as flagd's bucketing defines it.
pub fn murmur3(bytes: &[u8]) -> u32 {
    mur3::murmurhash3_x86_32(bytes, 0)
}

/// The bucket index for `hash` given cumulative weights; `None` when every
/// weight is zero.
pub fn pick(hash: u32, cumulative: &[u64]) -> Option<usize> {
    let total = *cumulative.last()?;
    if total == 0 {
        return None;
    }
    // in 128 bits: weights are clamped to u32::MAX each, so the total may
    // pass 2^32, and the product 2^64; the quotient is below `total`
    let bucket = ((u128::from(hash) * u128::from(total)) >> 32) as u64;
    cumulative.iter().position(|&c| bucket < c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Published MurmurHash3 x86_32 vectors (seed 0): "" -> 0 and
    /// "hello" -> 0x248bfa47 (from the algorithm's reference test suite).
    #[test]
    fn murmur3_matches_reference_vectors() {
        assert_eq!(murmur3(b""), 0);
        assert_eq!(murmur3(b"hello"), 0x248b_fa47);
    }

    #[test]
    fn pick_walks_cumulative_weights() {
        assert_eq!(pick(0, &[50, 100]), Some(0));
        assert_eq!(pick(u32::MAX, &[50, 100]), Some(1));
        assert_eq!(pick(u32::MAX / 2, &[50, 100]), Some(0));
        assert_eq!(pick(u32::MAX / 2 + 2, &[50, 100]), Some(1));
        assert_eq!(pick(7, &[0, 0]), None);
        assert_eq!(pick(7, &[]), None);
        // a zero-weight bucket is never selected
        assert_eq!(pick(0, &[0, 100]), Some(1));
    }

    /// Weights are clamped to u32::MAX each, so their total can pass 2^32:
    /// the bucket is still in range, and the split still even.
    #[test]
    fn totals_beyond_32_bits_still_pick_in_proportion() {
        let w = u64::from(u32::MAX);
        assert_eq!(pick(u32::MAX, &[w, 2 * w]), Some(1));
        assert_eq!(pick(u32::MAX / 2 - 1, &[w, 2 * w]), Some(0));
        assert_eq!(pick(u32::MAX / 2 + 2, &[w, 2 * w]), Some(1));
        assert_eq!(pick(u32::MAX, &[w, 2 * w, 3 * w]), Some(2));
    }
}
