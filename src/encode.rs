//! Encoding a data set into feature vectors: read + decode + preprocess on a prefetch
//! thread while the encoder runs the previous batch; bad items are skipped and reported
//! (with their error codes), never fatal; progress is shown.

use std::collections::BTreeMap;
use std::sync::mpsc;

use tch::Tensor;

use crate::data::source::{decode_item, ItemErrorKind};
use crate::data::{DataSet, DecodeLimits, ItemError, Preprocess};
use crate::model::features::{FeatureExtractor, LayerOffsets};
use crate::model::ModelError;
use crate::progress::Progress;

/// The features of the items that could be encoded, in data-set order.
#[derive(Debug)]
pub struct EncodedSet {
    pub ids: Vec<String>,
    /// `[N, D]` float32 on the CPU.
    pub values: Tensor,
    pub offsets: LayerOffsets,
    pub skipped: Vec<ItemError>,
    pub seconds: f64,
}

impl EncodedSet {
    /// Skipped items counted by error code, for a one-line report.
    pub fn skipped_by_code(&self) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for e in &self.skipped {
            *counts.entry(e.code()).or_insert(0) += 1;
        }
        counts
    }
}

/// Reads, decodes and preprocesses one item.
pub fn load_item(
    set: &DataSet,
    index: usize,
    limits: &DecodeLimits,
    pre: &Preprocess,
) -> Result<(String, Tensor), ItemError> {
    let item = set.get(index)?;
    let image = decode_item(&item, limits)?;
    let tensor = pre
        .apply(&image)
        .map_err(|e| ItemError { id: item.id.clone(), kind: ItemErrorKind::Preprocess(e.to_string()) })?;
    Ok((item.id, tensor))
}

struct PreparedBatch {
    ids: Vec<String>,
    images: Option<Tensor>,
    errors: Vec<ItemError>,
    items: usize,
}

pub struct EncodeOptions {
    pub batch_size: usize,
    pub limits: DecodeLimits,
    pub quiet: bool,
}

/// Encodes every item of `set`.
pub fn encode_set(
    extractor: &FeatureExtractor,
    set: &DataSet,
    opts: &EncodeOptions,
) -> Result<EncodedSet, ModelError> {
    let batch_size = opts.batch_size.max(1);
    let total = set.len();
    let pre = extractor.preprocess;
    let limits = opts.limits;
    let mut progress = Progress::new("encode", total as u64, opts.quiet);
    let mut ids = Vec::with_capacity(total);
    let mut chunks = Vec::new();
    let mut skipped = Vec::new();
    let mut offsets = None;

    std::thread::scope(|scope| -> Result<(), ModelError> {
        // Two batches in flight bound the memory held by prefetching.
        let (tx, rx) = mpsc::sync_channel::<PreparedBatch>(2);
        scope.spawn(move || {
            for start in (0..total).step_by(batch_size) {
                let end = (start + batch_size).min(total);
                let mut batch =
                    PreparedBatch { ids: Vec::new(), images: None, errors: Vec::new(), items: end - start };
                let mut tensors = Vec::new();
                for i in start..end {
                    match load_item(set, i, &limits, &pre) {
                        Ok((id, t)) => {
                            batch.ids.push(id);
                            tensors.push(t);
                        }
                        Err(e) => batch.errors.push(e),
                    }
                }
                if !tensors.is_empty() {
                    batch.images = Tensor::f_stack(&tensors, 0).ok();
                }
                if tx.send(batch).is_err() {
                    return; // the consumer stopped on an error
                }
            }
        });
        for batch in rx {
            for e in &batch.errors {
                tracing::warn!(id = %e.id, code = e.code(), "skipped: {e}");
            }
            skipped.extend(batch.errors);
            if let Some(images) = batch.images {
                let features = extractor.extract(&images)?;
                offsets.get_or_insert(features.offsets);
                chunks.push(features.values);
                ids.extend(batch.ids);
            }
            progress.inc(batch.items as u64, None);
        }
        Ok(())
    })?;
    let seconds = progress.finish().as_secs_f64();
    let values = if chunks.is_empty() {
        Tensor::f_zeros([0, 0], (tch::Kind::Float, tch::Device::Cpu))?
    } else {
        Tensor::f_cat(&chunks, 0)?
    };
    Ok(EncodedSet { ids, values, offsets: offsets.unwrap_or(LayerOffsets(vec![0])), skipped, seconds })
}
