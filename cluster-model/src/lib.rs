//! The typed cluster model (placeholder until the model lands).
