//! The Fenergo simulator (being written).
