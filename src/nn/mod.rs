//! Building blocks below any model (as candle-nn's layers): frozen weight matrices in f32 or f16
//! ([`weight`]), the plain linear layer ([`Linear`]), and the fused operations with their
//! backward passes ([`ops`]).

mod linear;
pub mod ops;
pub mod weight;

pub use linear::Linear;
pub use weight::{Weight, WeightDtype};
