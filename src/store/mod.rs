//! The reporting store (being written).
