//! Bearer tokens: what a client sends (`authorization: Bearer <token>`) and
//! the SHA-256 under which a server's tokens file names it.

use sha2::{Digest as _, Sha256};
use tonic::Status;

/// The hex SHA-256 of a token, as configured in tokens files.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A tonic interceptor that adds a bearer token to every call.
#[derive(Clone)]
pub struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl BearerToken {
    /// Sends `token` (or nothing when `None`).
    pub fn new(token: Option<&str>) -> Result<Self, Status> {
        let value = match token {
            Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| {
                Status::invalid_argument("the token holds characters a header cannot carry")
            })?),
            None => None,
        };
        Ok(Self(value))
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_hex_sha256() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn token_goes_into_the_authorization_header() {
        use tonic::service::Interceptor as _;
        let mut t = BearerToken::new(Some("s3cret")).expect("valid token");
        let req = t.call(tonic::Request::new(())).expect("intercepted");
        assert_eq!(
            req.metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer s3cret")
        );
        assert!(BearerToken::new(Some("bad\nvalue")).is_err());
    }
}
