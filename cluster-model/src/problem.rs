//! Problems with the input, as reported to the user.

use std::fmt;
use std::path::PathBuf;

/// One problem with the input, reported to the user. Displays like
/// `examples/demo/web.yaml: Service default/web: spec.ports[1].port: must be between 1 and 65535, got 0`.
///
/// Most problems mean the object (or file) was not applied; a few are warnings about an object
/// that was applied anyway (their message says so).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Problem {
    pub file: Option<PathBuf>,
    /// The object, e.g. "Service default/web".
    pub object: Option<String>,
    /// The field path inside the object, e.g. "spec.ports\[1\].port".
    pub field: Option<String>,
    pub message: String,
}

impl Problem {
    pub fn new(message: impl Into<String>) -> Self {
        Problem {
            file: None,
            object: None,
            field: None,
            message: message.into(),
        }
    }

    pub fn in_file(mut self, file: impl Into<PathBuf>) -> Self {
        self.file = Some(file.into());
        self
    }

    pub fn for_object(mut self, object: impl Into<String>) -> Self {
        self.object = Some(object.into());
        self
    }

    pub fn at_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if let Some(object) = &self.object {
            write!(f, "{object}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for Problem {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display() {
        let p = Problem::new("must be between 1 and 65535, got 0")
            .in_file("examples/demo/web.yaml")
            .for_object("Service default/web")
            .at_field("spec.ports[1].port");
        assert_eq!(
            p.to_string(),
            "examples/demo/web.yaml: Service default/web: spec.ports[1].port: must be between 1 and 65535, got 0"
        );
        assert_eq!(Problem::new("boom").to_string(), "boom");
        assert_eq!(
            Problem::new("boom").in_file("a.yaml").to_string(),
            "a.yaml: boom"
        );
    }
}
