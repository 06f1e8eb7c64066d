//! Errors of the engine: validation of flag documents (naming the flag and
//! the field), compilation of targeting rules, and the error codes a
//! resolution can carry.

use std::fmt;

/// One problem found in a flag document or definition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct ValidationError {
    /// The flag the problem is in; `None` for document-level problems.
    pub flag: Option<String>,
    /// Where, as a JSON pointer relative to the flag (or to the document).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl ValidationError {
    /// A problem in one flag, at `path` inside that flag.
    pub fn in_flag(flag: &str, path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            flag: Some(flag.to_owned()),
            path: path.into(),
            message: message.into(),
        }
    }

    /// A problem in the document outside any flag.
    pub fn in_document(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            flag: None,
            path: path.into(),
            message: message.into(),
        }
    }

    fn describe(&self) -> String {
        let path = if self.path.is_empty() {
            "/"
        } else {
            &self.path
        };
        match &self.flag {
            Some(flag) => format!("flag \"{flag}\": {path}: {}", self.message),
            None => format!("{path}: {}", self.message),
        }
    }
}

/// Every problem found in a document; never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<ValidationError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl From<ValidationError> for ValidationErrors {
    fn from(e: ValidationError) -> Self {
        Self(vec![e])
    }
}

/// Why a targeting rule could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct CompileError {
    /// Where in the rule, as a JSON pointer relative to `targeting`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl CompileError {
    pub(crate) fn new(path: &str, message: impl Into<String>) -> Self {
        Self {
            path: if path.is_empty() {
                "/".to_owned()
            } else {
                path.to_owned()
            },
            message: message.into(),
        }
    }
}

/// Why a document could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    /// Neither valid JSON nor valid YAML.
    #[error("document is not valid JSON ({json}) nor YAML ({yaml})")]
    Syntax {
        /// The JSON parser's complaint.
        json: String,
        /// The YAML parser's complaint.
        yaml: String,
    },
    /// Parsed, but the content is not a valid flag document.
    #[error("{0}")]
    Invalid(#[from] ValidationErrors),
}

/// The error code of a failed resolution (flagd and OpenFeature codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// No flag with that key.
    FlagNotFound,
    /// The flag's definition or targeting could not be compiled.
    ParseError,
    /// The flag's value is not of the requested type.
    TypeMismatch,
    /// A targeting key is required and missing.
    TargetingKeyMissing,
    /// The context is malformed.
    InvalidContext,
    /// Anything else.
    General,
}

impl ErrorCode {
    /// The code as flagd and OpenFeature spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FlagNotFound => "FLAG_NOT_FOUND",
            Self::ParseError => "PARSE_ERROR",
            Self::TypeMismatch => "TYPE_MISMATCH",
            Self::TargetingKeyMissing => "TARGETING_KEY_MISSING",
            Self::InvalidContext => "INVALID_CONTEXT",
            Self::General => "GENERAL",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
