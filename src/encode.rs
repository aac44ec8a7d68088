//! Encoding a data set into feature vectors: read + decode + preprocess on a prefetch
//! thread while the encoder runs the previous batch; bad items are skipped and reported
//! (with their error codes), never fatal; progress is shown. Each item also gets a seed
//! from its decoded pixels (for the scoring noise). Encoded sets can be cached on disk, keyed by
//! everything that determines them, so refitting with other LFDN settings skips encoding.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use tch::{Kind, Tensor};

use crate::data::source::{decode_item, ItemErrorKind};
use crate::data::{DataSet, DecodeLimits, ItemError, Preprocess};
use crate::model::features::{FeatureExtractor, Features, LayerOffsets};
use crate::model::ModelError;
use crate::progress::Progress;

/// The features of the items that could be encoded, in data-set order.
#[derive(Debug)]
pub struct EncodedSet {
    pub ids: Vec<String>,
    /// Per item, a seed derived from its content.
    pub seeds: Vec<u64>,
    /// `[N, D]` float32 on the CPU.
    pub values: Tensor,
    pub offsets: LayerOffsets,
    pub skipped: Vec<ItemError>,
    pub seconds: f64,
    /// True when the features came from the cache.
    pub cached: bool,
}

/// Skipped items counted by error code, for a one-line report.
pub fn count_by_code(errors: &[ItemError]) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for e in errors {
        *counts.entry(e.code()).or_insert(0) += 1;
    }
    counts
}

impl EncodedSet {
    pub fn skipped_by_code(&self) -> BTreeMap<&'static str, usize> {
        count_by_code(&self.skipped)
    }
}

/// Reads, decodes and preprocesses one item; returns its id, content seed and tensor.
pub fn load_item(
    set: &DataSet,
    index: usize,
    limits: &DecodeLimits,
    pre: &Preprocess,
) -> Result<(String, u64, Tensor), ItemError> {
    let item = set.get(index)?;
    let image = decode_item(&item, limits)?;
    // The daemon's preprocessing and seed, so an image scores the same by every path.
    let (tensor, seed) = crate::data::chain::to_tensor(&image, pre).map_err(|e| {
        let reason = match e {
            crate::data::chain::InputError::Preprocess(reason) => reason,
            other => other.to_string(),
        };
        ItemError { id: item.id.clone(), kind: ItemErrorKind::Preprocess(reason) }
    })?;
    Ok((item.id, seed, tensor))
}

/// One encoded batch, handed to the caller of [`for_each_batch`].
pub struct EncodedBatch {
    pub ids: Vec<String>,
    pub seeds: Vec<u64>,
    pub features: Option<Features>,
    pub errors: Vec<ItemError>,
}

struct PreparedBatch {
    ids: Vec<String>,
    seeds: Vec<u64>,
    images: Option<Tensor>,
    errors: Vec<ItemError>,
    items: usize,
}

#[derive(Debug, Clone)]
pub struct EncodeOptions {
    pub batch_size: usize,
    pub limits: DecodeLimits,
    pub quiet: bool,
}

/// Streams `set` through the encoder batch by batch, calling `f` on each; bad items
/// arrive in `errors`. Stops at the first error `f` or the encoder returns.
pub fn for_each_batch<E: From<ModelError>>(
    extractor: &FeatureExtractor,
    set: &DataSet,
    opts: &EncodeOptions,
    label: &str,
    mut f: impl FnMut(EncodedBatch) -> Result<(), E>,
) -> Result<f64, E> {
    let batch_size = opts.batch_size.max(1);
    let total = set.len();
    let pre = extractor.preprocess;
    let limits = opts.limits;
    let mut progress = Progress::new(label, total as u64, opts.quiet);
    std::thread::scope(|scope| -> Result<(), E> {
        // Two batches in flight bound the memory held by prefetching.
        let (tx, rx) = mpsc::sync_channel::<PreparedBatch>(2);
        scope.spawn(move || {
            for start in (0..total).step_by(batch_size) {
                let end = (start + batch_size).min(total);
                let batch = load_batch(set, start, end, &limits, &pre);
                if tx.send(batch).is_err() {
                    return; // the consumer stopped on an error
                }
            }
        });
        for batch in rx {
            for e in &batch.errors {
                tracing::warn!(id = %e.id, code = e.code(), "skipped: {e}");
            }
            let features = match &batch.images {
                Some(images) => Some(extractor.extract(images)?),
                None => None,
            };
            let items = batch.items as u64;
            f(EncodedBatch { ids: batch.ids, seeds: batch.seeds, features, errors: batch.errors })?;
            progress.inc(items, None);
        }
        Ok(())
    })?;
    Ok(progress.finish().as_secs_f64())
}

/// Encodes every item of `set` into memory.
pub fn encode_set(
    extractor: &FeatureExtractor,
    set: &DataSet,
    opts: &EncodeOptions,
) -> Result<EncodedSet, ModelError> {
    let mut ids = Vec::with_capacity(set.len());
    let mut seeds = Vec::with_capacity(set.len());
    let mut chunks = Vec::new();
    let mut skipped = Vec::new();
    let mut offsets = None;
    let seconds =
        for_each_batch(extractor, set, opts, "encode", |b: EncodedBatch| -> Result<(), ModelError> {
            skipped.extend(b.errors);
            if let Some(f) = b.features {
                offsets.get_or_insert(f.offsets);
                chunks.push(f.values);
                ids.extend(b.ids);
                seeds.extend(b.seeds);
            }
            Ok(())
        })?;
    let values = if chunks.is_empty() {
        Tensor::f_zeros([0, 0], (Kind::Float, tch::Device::Cpu))?
    } else {
        Tensor::f_cat(&chunks, 0)?
    };
    Ok(EncodedSet {
        ids,
        seeds,
        values,
        offsets: offsets.unwrap_or(LayerOffsets(vec![0])),
        skipped,
        seconds,
        cached: false,
    })
}

/// Where encoded sets are cached: `$DLSR_CACHE`, else `$XDG_CACHE_HOME/dlsr`, else
/// `~/.cache/dlsr`, with `features/` below it.
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("DLSR_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(std::env::temp_dir)
            .join("dlsr")
    });
    base.join("features")
}

/// The cache key: encoder identity (incl. weights checksum) and precision,
/// preprocessing, decode limits, the data's fingerprint and the item limit.
pub fn cache_key(
    extractor: &FeatureExtractor,
    set: &DataSet,
    opts: &EncodeOptions,
) -> Result<String, ModelError> {
    use sha2::Digest;
    let fingerprint = set.fingerprint().map_err(|e| ModelError::Io {
        path: PathBuf::from(set.spec()),
        source: std::io::Error::other(e.to_string()),
    })?;
    let key = serde_json::json!({
        // 2: seeds from decoded pixels (v1 hashed the container's bytes).
        "v": 2,
        "encoder": extractor.encoder.identity(),
        "precision": extractor.encoder.precision(),
        "preprocess": extractor.preprocess,
        "limits": opts.limits,
        "data": fingerprint,
        "id_prefix": set.id_prefix(),
        "len": set.len(),
    });
    Ok(hex::encode(sha2::Sha256::digest(key.to_string().as_bytes())))
}

fn load_cached(path: &Path) -> Option<EncodedSet> {
    let meta = crate::tensor_file::read_metadata(path).ok()?;
    let tensors = crate::tensor_file::read_tensors(path).ok()?;
    let ids: Vec<String> = serde_json::from_str(meta.get("ids")?).ok()?;
    let skipped: Vec<(String, String)> = serde_json::from_str(meta.get("skipped")?).ok()?;
    let values = tensors.get("features")?.shallow_clone();
    let seeds: Vec<i64> = Vec::try_from(tensors.get("seeds")?).ok()?;
    let offsets: Vec<i64> = Vec::try_from(tensors.get("offsets")?).ok()?;
    if values.size().first() != Some(&(ids.len() as i64)) || seeds.len() != ids.len() {
        return None;
    }
    Some(EncodedSet {
        ids,
        seeds: seeds.into_iter().map(|s| s as u64).collect(),
        values,
        offsets: LayerOffsets(offsets),
        skipped: skipped
            .into_iter()
            .map(|(id, reason)| ItemError { id, kind: ItemErrorKind::Cached(reason) })
            .collect(),
        seconds: 0.0,
        cached: true,
    })
}

/// [`encode_set`] through the on-disk cache (`cache: None` disables it).
pub fn encode_set_cached(
    extractor: &FeatureExtractor,
    set: &DataSet,
    opts: &EncodeOptions,
    cache: Option<&Path>,
) -> Result<EncodedSet, ModelError> {
    let Some(dir) = cache else { return encode_set(extractor, set, opts) };
    let key = cache_key(extractor, set, opts)?;
    let path = dir.join(format!("{key}.safetensors"));
    if let Some(hit) = load_cached(&path) {
        tracing::info!(path = %path.display(), "features from cache");
        return Ok(hit);
    }
    let encoded = encode_set(extractor, set, opts)?;
    let seeds: Vec<i64> = encoded.seeds.iter().map(|&s| s as i64).collect();
    let skipped: Vec<(String, String)> =
        encoded.skipped.iter().map(|e| (e.id.clone(), e.kind.to_string())).collect();
    let meta = BTreeMap::from([
        ("ids".to_string(), serde_json::to_string(&encoded.ids).unwrap_or_default()),
        ("skipped".to_string(), serde_json::to_string(&skipped).unwrap_or_default()),
        ("data".to_string(), set.spec().to_string()),
    ]);
    let offsets = Tensor::from_slice(&encoded.offsets.0);
    let seeds = Tensor::from_slice(&seeds);
    // A cache that cannot be written is a warning, not a failure.
    if let Err(e) = std::fs::create_dir_all(dir).map_err(|e| e.to_string()).and_then(|_| {
        crate::tensor_file::write(
            &path,
            &[("features", &encoded.values), ("seeds", &seeds), ("offsets", &offsets)],
            &meta,
        )
        .map_err(|e| e.to_string())
    }) {
        tracing::warn!("could not write the feature cache: {e}");
    }
    Ok(encoded)
}

/// Loads one batch (`start..end` of `set`): items decoded and preprocessed, stacked.
fn load_batch(
    set: &DataSet,
    start: usize,
    end: usize,
    limits: &DecodeLimits,
    pre: &Preprocess,
) -> PreparedBatch {
    let mut batch = PreparedBatch {
        ids: Vec::new(),
        seeds: Vec::new(),
        images: None,
        errors: Vec::new(),
        items: end - start,
    };
    let mut tensors = Vec::new();
    for i in start..end {
        match load_item(set, i, limits, pre) {
            Ok((id, seed, t)) => {
                batch.ids.push(id);
                batch.seeds.push(seed);
                tensors.push(t);
            }
            Err(e) => batch.errors.push(e),
        }
    }
    if !tensors.is_empty() {
        match Tensor::f_stack(&tensors, 0) {
            Ok(t) => batch.images = Some(t),
            Err(e) => {
                let reason = e.to_string();
                batch.errors.extend(
                    batch
                        .ids
                        .drain(..)
                        .map(|id| ItemError { id, kind: ItemErrorKind::Preprocess(reason.clone()) }),
                );
                batch.seeds.clear();
            }
        }
    }
    batch
}

/// What a worker of [`parallel_batches`] is given for one batch.
pub struct RawBatch {
    pub ids: Vec<String>,
    pub seeds: Vec<u64>,
    /// `[B, 3, S, S]` preprocessed images (CPU); None when no item of the batch decoded.
    pub images: Option<Tensor>,
    pub errors: Vec<ItemError>,
}

/// Runs `set` through `workers` threads that each read, decode, preprocess and process
/// whole batches with their own state (`make_state`, e.g. an encoder and LFDN each) and
/// `threads_each` libtorch threads, and hands the results to `consume` in data-set order.
///
/// On a CPU, libtorch's intra-op threads scale poorly on small tensors (a 64-px batch's
/// maps are 32x32 to 2x2; the LFDN's products are 64 x 512): two workers of one thread
/// did more than one worker of two threads on 2 cores (README, "Benchmark"), and a
/// worker's decoding overlaps the other's inference. One worker runs on the calling
/// thread's settings (the GPU case). Stops at the first error.
pub fn parallel_batches<S, T, E>(
    set: &DataSet,
    opts: &EncodeOptions,
    pre: Preprocess,
    (workers, threads_each): (usize, i32),
    label: &str,
    make_state: impl Fn() -> Result<S, E> + Sync,
    process: impl Fn(&mut S, RawBatch) -> Result<T, E> + Sync,
    mut consume: impl FnMut(T) -> Result<(), E>,
) -> Result<f64, E>
where
    T: Send,
    E: Send,
{
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let batch_size = opts.batch_size.max(1);
    let total = set.len();
    let batches = total.div_ceil(batch_size);
    let workers = workers.clamp(1, batches.max(1));
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let limits = opts.limits;
    let mut progress = Progress::new(label, total as u64, opts.quiet);
    std::thread::scope(|scope| -> Result<(), E> {
        // Bounded: a worker that runs ahead waits instead of piling up results.
        let (tx, rx) = mpsc::sync_channel::<(usize, usize, Result<T, E>)>(2 * workers);
        for _ in 0..workers {
            let tx = tx.clone();
            let (next, stop, make_state, process) = (&next, &stop, &make_state, &process);
            scope.spawn(move || {
                if workers > 1 {
                    tch::set_num_threads(threads_each);
                }
                let mut state = match make_state() {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send((usize::MAX, 0, Err(e)));
                        return;
                    }
                };
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= batches || stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let start = index * batch_size;
                    let end = (start + batch_size).min(total);
                    let b = load_batch(set, start, end, &limits, &pre);
                    for e in &b.errors {
                        tracing::warn!(id = %e.id, code = e.code(), "skipped: {e}");
                    }
                    let raw = RawBatch { ids: b.ids, seeds: b.seeds, images: b.images, errors: b.errors };
                    let result = process(&mut state, raw);
                    let failed = result.is_err();
                    if tx.send((index, end - start, result)).is_err() || failed {
                        return;
                    }
                }
            });
        }
        drop(tx);
        // Results arrive in any order; hand them on in data-set order.
        let mut pending = BTreeMap::new();
        let mut expected = 0;
        for (index, items, result) in rx {
            let result = match result {
                Ok(r) => r,
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            };
            pending.insert(index, (items, result));
            while let Some((items, r)) = pending.remove(&expected) {
                if let Err(e) = consume(r) {
                    stop.store(true, Ordering::Relaxed);
                    return Err(e);
                }
                progress.inc(items as u64, None);
                expected += 1;
            }
        }
        Ok(())
    })?;
    Ok(progress.finish().as_secs_f64())
}
