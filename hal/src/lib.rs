//! edgehal: importers, passes, sessions.
#![forbid(unsafe_code)]
