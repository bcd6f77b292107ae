//! Criterion benches for the qint8 workspace live in `benches/`; this library is empty.
