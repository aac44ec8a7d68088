//! Images in: decoding under limits ([`decode`]), data-set readers ([`source`]) and
//! preprocessing for an encoder ([`preprocess`]).
//!
//! Every failure names the item and carries a bounded error code, so commands can skip
//! bad files with a count and the daemon can dead-letter them; nothing here panics on
//! input from outside the process.

pub mod chain;
pub mod decode;
pub mod envelope;
pub mod preprocess;
pub mod reference;
pub mod source;
pub mod variants;

pub use decode::{DecodeError, DecodeLimits, Image};
pub use preprocess::{Normalisation, Preprocess, ResizeMode};
pub use source::{DataError, DataSet, ItemContent, ItemError, RawItem};
