//! Data-set readers: a single image file, a folder of images (recursive, sorted), an IDX
//! image file (`.gz` or plain) and the MNIST-5k CSV (784 pixels + label, `.gz` or plain).
//!
//! A data set is opened from a SPEC string (a path); the kind is decided from what the
//! path is and, for files, from the name and the magic bytes. Items carry stable ids:
//! the path relative to the folder, or `file#index` for IDX and CSV records. Reading an
//! item can fail on its own ([`ItemError`]); opening the set fails only when the set as a
//! whole is unusable ([`DataError`]).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::decode::{DecodeError, DecodeLimits};

/// The content of one item before preprocessing.
#[derive(Debug, Clone)]
pub enum ItemContent {
    /// Encoded image bytes (any format [`super::decode::decode`] takes).
    Encoded(Vec<u8>),
    /// Raw 8-bit grey pixels, row-major (IDX and CSV records).
    Grey { width: u32, height: u32, pixels: Vec<u8> },
}

/// The objects under a cloud prefix, fetched on demand.
struct Objects {
    /// The SPEC as given, e.g. `s3://bucket/prefix/`.
    spec: String,
    /// Object keys (from the bucket's root) and sizes, sorted.
    keys: Vec<(String, u64)>,
    /// What ids are relative to: the prefix's folder.
    prefix: String,
    fetcher: super::reference::Fetcher,
    runtime: tokio::runtime::Runtime,
}

#[derive(Debug, Clone)]
pub struct RawItem {
    pub id: String,
    pub content: ItemContent,
}

/// Failure to open or parse a data set as a whole.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not found")]
    NotFound { path: PathBuf },
    #[error("{path}: malformed IDX file: {reason}")]
    BadIdx { path: PathBuf, reason: String },
    #[error("{path}: malformed CSV on line {line}: {reason}")]
    BadCsv { path: PathBuf, line: usize, reason: String },
    #[error("{path}: contains no images")]
    NoImages { path: PathBuf },
    /// The error names the SPEC itself.
    #[error("{source}")]
    Remote { spec: String, source: super::reference::FetchError },
    #[error("{spec}: {reason}")]
    BadVariant { spec: String, reason: String },
}

/// Failure of one item; the set can go on past it.
#[derive(Debug, thiserror::Error)]
#[error("{id}: {kind}")]
pub struct ItemError {
    pub id: String,
    pub kind: ItemErrorKind,
}

#[derive(Debug, thiserror::Error)]
pub enum ItemErrorKind {
    #[error("cannot read file: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Fetch(#[from] super::reference::FetchError),
    #[error("preprocessing failed: {0}")]
    Preprocess(String),
    /// An error recorded when the set was encoded into the feature cache.
    #[error("{0}")]
    Cached(String),
}

impl ItemError {
    /// A bounded code (for reports and metrics).
    pub fn code(&self) -> &'static str {
        match &self.kind {
            ItemErrorKind::Io(_) => "io",
            ItemErrorKind::Decode(d) => d.code(),
            ItemErrorKind::Fetch(f) => f.code(),
            ItemErrorKind::Preprocess(_) => "preprocess",
            ItemErrorKind::Cached(_) => "cached",
        }
    }
}

/// File-name extensions a folder scan takes as images (case-insensitive).
pub const IMAGE_EXTENSIONS: [&str; 9] = ["png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff", "jfif"];

enum Kind {
    Files {
        base: PathBuf,
        files: Vec<PathBuf>,
    },
    /// Grey records held in memory: IDX and CSV sets (Fashion-MNIST train is 47 MB).
    Records {
        name: String,
        width: u32,
        height: u32,
        pixels: Vec<u8>,
        count: usize,
        /// The record numbers of the items when a variant kept some of the file's
        /// records (`from`, `classes`): ids keep the file's numbering.
        numbers: Option<Vec<usize>>,
    },
    Objects(Box<Objects>),
}

/// An opened data set: its items can be read in order, any number of times.
pub struct DataSet {
    spec: String,
    kind: Kind,
    limit: Option<usize>,
    /// Put before every item id (with a `/`), so that ids stay unique when several SPECs
    /// are read in one run (see [`id_prefixes`]).
    id_prefix: Option<String>,
    /// Files a folder scan passed over because their extension is not an image's.
    pub ignored_files: usize,
}

impl std::fmt::Debug for DataSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataSet").field("spec", &self.spec).field("len", &self.len()).finish()
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io { path: path.to_path_buf(), source }
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = fs::read(path).map_err(io_err(path))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(raw.as_slice()).read_to_end(&mut out).map_err(io_err(path))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

fn is_idx_name(name: &str) -> bool {
    let n = name.strip_suffix(".gz").unwrap_or(name);
    n.ends_with("-ubyte") || n.ends_with(".idx") || n.ends_with(".idx3")
}

fn is_csv_name(name: &str) -> bool {
    let n = name.strip_suffix(".gz").unwrap_or(name);
    n.ends_with(".csv")
}

impl DataSet {
    /// Opens SPEC: an image file, a folder of images, an IDX file, an MNIST-style CSV,
    /// or the images under an object-store prefix (`s3://bucket/prefix/`, `gs://`, `az://`;
    /// credentials and endpoint from the store's standard environment, e.g.
    /// `AWS_ENDPOINT_URL`).
    pub fn open(spec: &str) -> Result<Self, DataError> {
        if super::reference::is_remote_spec(spec) {
            return Self::open_objects(spec);
        }
        if let (path, Some(options)) = super::variants::split_spec(spec) {
            if fs::metadata(spec).is_err() {
                return Self::open_variant(spec, path, options);
            }
        }
        let path = PathBuf::from(spec);
        let meta = fs::metadata(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DataError::NotFound { path: path.clone() },
            _ => DataError::Io { path: path.clone(), source: e },
        })?;
        let mut ignored_files = 0;
        let kind = if meta.is_dir() {
            let mut files = Vec::new();
            walk(&path, &mut files, &mut ignored_files)?;
            files.sort();
            if files.is_empty() {
                return Err(DataError::NoImages { path });
            }
            Kind::Files { base: path, files }
        } else {
            let name = file_name(&path);
            if is_idx_name(&name) {
                read_idx(&path)?
            } else if is_csv_name(&name) {
                read_csv(&path)?
            } else {
                let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
                Kind::Files { base, files: vec![path] }
            }
        };
        Ok(Self { spec: spec.to_string(), kind, limit: None, id_prefix: None, ignored_files })
    }

    /// A record set's variant ([`super::variants`]): some records, transformed.
    fn open_variant(spec: &str, path: &str, options: &str) -> Result<Self, DataError> {
        let bad = |reason: String| DataError::BadVariant { spec: spec.to_string(), reason };
        let variant = super::variants::Variant::parse(options).map_err(bad)?;
        let name = file_name(Path::new(path));
        let (kind, labels) = if is_idx_name(&name) {
            (read_idx(Path::new(path))?, None)
        } else if is_csv_name(&name) {
            read_csv_labelled(Path::new(path))?
        } else {
            return Err(bad("options (after ?) apply to IDX and CSV record files only".into()));
        };
        let Kind::Records { name, width, height, pixels, count, .. } = kind else {
            return Err(bad("options apply to record files only".into()));
        };
        let labels = match (&variant.classes, labels) {
            (None, _) => None,
            (Some(_), Some(l)) => Some(l),
            (Some(_), None) => Some(read_idx_labels(&labels_file(Path::new(path)).ok_or_else(|| {
                bad("classes= needs the labels: no *-labels-idx1-ubyte file beside the images".into())
            })?)?),
        };
        if labels.as_ref().is_some_and(|l| l.len() != count) {
            return Err(bad(format!("{} labels for {count} images", labels.map_or(0, |l| l.len()))));
        }
        let size = (width * height) as usize;
        let mut kept_pixels = Vec::new();
        let mut numbers = Vec::new();
        for n in variant.from..count {
            if let (Some(classes), Some(labels)) = (&variant.classes, &labels) {
                if !classes.contains(&labels[n]) {
                    continue;
                }
            }
            let mut image = pixels[n * size..(n + 1) * size].to_vec();
            variant.apply(&mut image, width as usize, height as usize);
            kept_pixels.extend_from_slice(&image);
            numbers.push(n);
        }
        if numbers.is_empty() {
            return Err(bad("no record is left".into()));
        }
        let kind = Kind::Records {
            name,
            width,
            height,
            pixels: kept_pixels,
            count: numbers.len(),
            numbers: Some(numbers),
        };
        Ok(Self { spec: spec.to_string(), kind, limit: None, id_prefix: None, ignored_files: 0 })
    }

    fn open_objects(spec: &str) -> Result<Self, DataError> {
        use super::reference::{FetchPolicy, Fetcher, Persistence};
        let remote = |source| DataError::Remote { spec: spec.to_string(), source };
        let runtime =
            super::chain::io_runtime().map_err(|e| DataError::Io { path: spec.into(), source: e })?;
        let fetcher =
            Fetcher::new(FetchPolicy { persistence: Persistence::Retries, ..FetchPolicy::default() });
        let listed = runtime.block_on(super::reference::list_prefix(&fetcher, spec)).map_err(remote)?;
        let total = listed.len();
        let keys: Vec<(String, u64)> =
            listed.into_iter().filter(|(k, _)| has_image_extension(Path::new(k))).collect();
        if keys.is_empty() {
            return Err(DataError::NoImages { path: spec.into() });
        }
        let after_bucket =
            spec.split_once("://").map_or("", |(_, r)| r).split_once('/').map_or("", |(_, p)| p);
        let prefix = match after_bucket.rfind('/') {
            Some(i) => after_bucket[..=i].to_string(),
            None => String::new(),
        };
        let ignored_files = total - keys.len();
        let objects = Objects { spec: spec.to_string(), keys, prefix, fetcher, runtime };
        Ok(Self {
            spec: spec.to_string(),
            kind: Kind::Objects(Box::new(objects)),
            limit: None,
            id_prefix: None,
            ignored_files,
        })
    }

    /// Keeps only the first `n` items.
    pub fn with_limit(mut self, n: Option<usize>) -> Self {
        self.limit = n;
        self
    }

    /// Prefixes every item id with `prefix/` (None or empty: ids as they are).
    pub fn with_id_prefix(mut self, prefix: Option<String>) -> Self {
        self.id_prefix = prefix.filter(|p| !p.is_empty());
        self
    }

    pub fn id_prefix(&self) -> Option<&str> {
        self.id_prefix.as_deref()
    }

    fn item_id(&self, id: String) -> String {
        match &self.id_prefix {
            Some(prefix) => format!("{prefix}/{id}"),
            None => id,
        }
    }

    /// A file's id: its path under the folder (the path itself for a file SPEC).
    fn file_id(&self, base: &Path, path: &Path) -> String {
        self.item_id(
            path.strip_prefix(base)
                .ok()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(path)
                .to_string_lossy()
                .into_owned(),
        )
    }

    pub fn spec(&self) -> &str {
        &self.spec
    }

    fn full_len(&self) -> usize {
        match &self.kind {
            Kind::Files { files, .. } => files.len(),
            Kind::Records { count, .. } => *count,
            Kind::Objects(o) => o.keys.len(),
        }
    }

    pub fn len(&self) -> usize {
        let n = self.full_len();
        self.limit.map_or(n, |l| l.min(n))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What identifies the data's content for caching: a hash of the IDX/CSV file, or of
    /// the folder's file list with sizes and modification times.
    pub fn fingerprint(&self) -> Result<String, DataError> {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        match &self.kind {
            Kind::Files { files, .. } => {
                for f in files {
                    let m = fs::metadata(f).map_err(io_err(f))?;
                    let mtime = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
                    h.update(format!("{}\0{}\0{:?}\n", f.display(), m.len(), mtime).as_bytes());
                }
            }
            Kind::Records { pixels, width, height, .. } => {
                h.update(format!("{width}x{height}\n").as_bytes());
                h.update(pixels);
            }
            Kind::Objects(o) => {
                for (key, size) in &o.keys {
                    h.update(format!("{}\0{key}\0{size}\n", o.spec).as_bytes());
                }
            }
        }
        Ok(hex::encode(h.finalize()))
    }

    /// Reads item `index` (< `len()`).
    pub fn get(&self, index: usize) -> Result<RawItem, ItemError> {
        match &self.kind {
            Kind::Files { base, files } => {
                let path = &files[index];
                let id = self.file_id(base, path);
                let bytes = fs::read(path).map_err(|e| ItemError { id: id.clone(), kind: e.into() })?;
                Ok(RawItem { id, content: ItemContent::Encoded(bytes) })
            }
            Kind::Records { name, width, height, pixels, numbers, .. } => {
                let size = (*width * *height) as usize;
                let number = numbers.as_ref().map_or(index, |n| n[index]);
                Ok(RawItem {
                    id: self.item_id(format!("{name}#{number}")),
                    content: ItemContent::Grey {
                        width: *width,
                        height: *height,
                        pixels: pixels[index * size..(index + 1) * size].to_vec(),
                    },
                })
            }
            Kind::Objects(o) => {
                let key = &o.keys[index].0;
                let id = self.item_id(key.strip_prefix(&o.prefix).unwrap_or(key).to_string());
                let uri = super::reference::object_uri(&o.spec, key);
                let fetched = o.fetcher.policy().parse(&uri).map_err(ItemErrorKind::from).and_then(|r| {
                    o.runtime
                        .block_on(o.fetcher.fetch(&r, &super::reference::Unobserved))
                        .map_err(ItemErrorKind::from)
                });
                match fetched {
                    Ok(f) => Ok(RawItem { id, content: ItemContent::Encoded(f.bytes) }),
                    Err(kind) => Err(ItemError { id, kind }),
                }
            }
        }
    }

    /// Item `index`'s id and a URI that refers to it where it is (`file://` with the
    /// absolute path, or the object's URI), for publishing references; IDX and CSV
    /// records live inside one file and have none.
    pub fn item_uri(&self, index: usize) -> Result<(String, String), ItemError> {
        match &self.kind {
            Kind::Files { base, files } => {
                let path = &files[index];
                let id = self.file_id(base, path);
                let absolute = path.canonicalize().map_err(|e| ItemError { id: id.clone(), kind: e.into() })?;
                let uri = url::Url::from_file_path(&absolute).map_err(|_| ItemError {
                    id: id.clone(),
                    kind: ItemErrorKind::Preprocess(format!("{} has no file:// URI", absolute.display())),
                })?;
                Ok((id, uri.to_string()))
            }
            Kind::Records { name, .. } => Err(ItemError {
                id: self.item_id(format!("{name}#{index}")),
                kind: ItemErrorKind::Preprocess(
                    "an IDX or CSV record has no URI of its own (publish it as bytes, or write it out as a file)".into(),
                ),
            }),
            Kind::Objects(o) => {
                let key = &o.keys[index].0;
                let id = self.item_id(key.strip_prefix(&o.prefix).unwrap_or(key).to_string());
                Ok((id, super::reference::object_uri(&o.spec, key)))
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = Result<RawItem, ItemError>> + '_ {
        (0..self.len()).map(move |i| self.get(i))
    }
}

/// Id prefixes that keep item ids unique when several SPECs are read in one run (score,
/// publish, audit): with several SPECs an item's id is its path as given, i.e. a folder
/// SPEC (as typed, without a trailing `/`) before the path inside it, or a file SPEC's
/// folder before its name. `fmnist/ mnist/` gives `fmnist/00000.png` and
/// `mnist/00000.png`; `data/a.idx.gz` gives `data/a.idx.gz#0`. With one SPEC ids stay
/// relative to it, as before.
pub fn id_prefixes(specs: &[String]) -> Vec<Option<String>> {
    if specs.len() < 2 {
        return vec![None; specs.len()];
    }
    specs
        .iter()
        .map(|spec| {
            if super::reference::is_remote_spec(spec) {
                return Some(spec.trim_end_matches('/').to_string());
            }
            let trimmed = spec.trim_end_matches('/');
            let path = Path::new(if trimmed.is_empty() { spec.as_str() } else { trimmed });
            let folder = if path.is_dir() { Some(path) } else { path.parent() };
            folder.map(|f| f.to_string_lossy().into_owned()).filter(|f| !f.is_empty())
        })
        .collect()
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>, ignored: &mut usize) -> Result<(), DataError> {
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let ty = entry.file_type().map_err(io_err(&path))?;
        if ty.is_dir() || (ty.is_symlink() && path.is_dir()) {
            walk(&path, out, ignored)?;
        } else if has_image_extension(&path) {
            out.push(path);
        } else {
            *ignored += 1;
        }
    }
    Ok(())
}

/// Parses an IDX file of unsigned bytes with 3 dimensions (count, rows, columns).
fn read_idx(path: &Path) -> Result<Kind, DataError> {
    let bad = |reason: String| DataError::BadIdx { path: path.to_path_buf(), reason };
    let data = read_maybe_gz(path)?;
    if data.len() < 4 || data[0] != 0 || data[1] != 0 {
        return Err(bad("missing the 0x0000 magic prefix".into()));
    }
    if data[2] != 0x08 {
        return Err(bad(format!("element type 0x{:02x} is not unsigned byte (0x08)", data[2])));
    }
    let ndim = data[3] as usize;
    if ndim != 3 {
        return Err(bad(format!("{ndim} dimensions; image files have 3 (count, rows, columns)")));
    }
    let header = 4 + 4 * ndim;
    if data.len() < header {
        return Err(bad("truncated header".into()));
    }
    let dim =
        |i: usize| u32::from_be_bytes([data[4 + 4 * i], data[5 + 4 * i], data[6 + 4 * i], data[7 + 4 * i]]);
    let (count, height, width) = (dim(0) as usize, dim(1), dim(2));
    let expected = count
        .checked_mul(height as usize)
        .and_then(|n| n.checked_mul(width as usize))
        .ok_or_else(|| bad("dimensions overflow".into()))?;
    if data.len() - header != expected {
        return Err(bad(format!(
            "{count}x{height}x{width} needs {expected} bytes of data, file has {}",
            data.len() - header
        )));
    }
    if width == 0 || height == 0 {
        return Err(bad("zero-sized images".into()));
    }
    Ok(Kind::Records {
        name: file_name(path),
        width,
        height,
        pixels: data[header..].to_vec(),
        count,
        numbers: None,
    })
}

/// The IDX labels file beside an images file (`*-images-idx3-ubyte[.gz]` ->
/// `*-labels-idx1-ubyte[.gz]`), if there is one.
fn labels_file(images: &Path) -> Option<PathBuf> {
    let name = file_name(images);
    let labels = name.replace("images-idx3", "labels-idx1");
    let path = images.with_file_name(labels);
    (path != images && path.is_file()).then_some(path)
}

/// An IDX labels file: magic 0x00000801, a count, one byte per label.
fn read_idx_labels(path: &Path) -> Result<Vec<u8>, DataError> {
    let data = read_maybe_gz(path)?;
    let bad = |reason: &str| DataError::BadIdx { path: path.to_path_buf(), reason: reason.into() };
    if data.len() < 8 || data[..4] != [0, 0, 8, 1] {
        return Err(bad("not an IDX labels file (magic 0x00000801)"));
    }
    let count = u32::from_be_bytes([data[4], data[5], data[6], data[7]]) as usize;
    if data.len() - 8 != count {
        return Err(bad("the label count does not match the file's length"));
    }
    Ok(data[8..].to_vec())
}

/// Parses a CSV of 784 grey pixels (0..255) per line, optionally followed by a label.
fn read_csv(path: &Path) -> Result<Kind, DataError> {
    read_csv_labelled(path).map(|(kind, _)| kind)
}

/// [`read_csv`] and the labels, when every line has one.
fn read_csv_labelled(path: &Path) -> Result<(Kind, Option<Vec<u8>>), DataError> {
    const SIDE: u32 = 28;
    const PIXELS: usize = (SIDE * SIDE) as usize;
    let data = read_maybe_gz(path)?;
    let text = String::from_utf8(data).map_err(|e| DataError::BadCsv {
        path: path.to_path_buf(),
        line: 0,
        reason: format!("not UTF-8 text: {e}"),
    })?;
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    let mut count = 0;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |reason: String| DataError::BadCsv { path: path.to_path_buf(), line: n + 1, reason };
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != PIXELS && fields.len() != PIXELS + 1 {
            // A header line of column names is allowed once, at the top.
            if n == 0 && fields.first().is_some_and(|f| f.trim().parse::<f64>().is_err()) {
                continue;
            }
            return Err(bad(format!("{} fields, expected {PIXELS} pixels (+ optional label)", fields.len())));
        }
        for field in &fields[..PIXELS] {
            let v: f64 = field.trim().parse().map_err(|_| bad(format!("{field:?} is not a number")))?;
            if !(0.0..=255.0).contains(&v) {
                return Err(bad(format!("pixel value {v} outside 0..255")));
            }
            pixels.push(v.round() as u8);
        }
        if let Some(label) = fields.get(PIXELS).and_then(|l| l.trim().parse::<u8>().ok()) {
            labels.push(label);
        }
        count += 1;
    }
    if count == 0 {
        return Err(DataError::NoImages { path: path.to_path_buf() });
    }
    let labels = (labels.len() == count).then_some(labels);
    Ok((
        Kind::Records { name: file_name(path), width: SIDE, height: SIDE, pixels, count, numbers: None },
        labels,
    ))
}

/// Decodes an item to 8-bit RGB; grey records are replicated to three channels.
pub fn decode_item(item: &RawItem, limits: &DecodeLimits) -> Result<super::Image, ItemError> {
    match &item.content {
        ItemContent::Encoded(bytes) => super::decode::decode(bytes, limits)
            .map_err(|e| ItemError { id: item.id.clone(), kind: e.into() }),
        ItemContent::Grey { width, height, pixels } => Ok(super::Image {
            width: *width,
            height: *height,
            rgb: pixels.iter().flat_map(|&p| [p, p, p]).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_idx(path: &Path, count: u32, h: u32, w: u32, gzip: bool) {
        let mut data = vec![0, 0, 8, 3];
        for d in [count, h, w] {
            data.extend_from_slice(&d.to_be_bytes());
        }
        data.extend((0..count * h * w).map(|i| (i % 251) as u8));
        let bytes = if gzip {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(&data).unwrap();
            enc.finish().unwrap()
        } else {
            data
        };
        fs::write(path, bytes).unwrap();
    }

    #[test]
    fn reads_idx_plain_and_gzipped_with_file_index_ids() {
        let dir = tempfile::tempdir().unwrap();
        for gzip in [false, true] {
            let path = dir.path().join(if gzip { "x-idx3-ubyte.gz" } else { "x-idx3-ubyte" });
            write_idx(&path, 3, 2, 4, gzip);
            let set = DataSet::open(path.to_str().unwrap()).unwrap();
            assert_eq!(set.len(), 3);
            let item = set.get(2).unwrap();
            assert_eq!(item.id, format!("{}#2", file_name(&path)));
            match item.content {
                ItemContent::Grey { width, height, pixels } => {
                    assert_eq!((width, height), (4, 2));
                    assert_eq!(pixels[0], 16);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn truncated_idx_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad-idx3-ubyte");
        write_idx(&path, 3, 2, 4, false);
        let mut bytes = fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 1);
        fs::write(&path, bytes).unwrap();
        let err = DataSet::open(path.to_str().unwrap()).unwrap_err();
        assert!(err.to_string().contains("needs 24 bytes"), "{err}");
    }

    #[test]
    fn reads_csv_with_labels_and_rejects_short_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("digits.csv");
        let row: Vec<String> = (0..784).map(|i| (i % 256).to_string()).collect();
        fs::write(&path, format!("{},5\n{},7\n", row.join(","), row.join(","))).unwrap();
        let set = DataSet::open(path.to_str().unwrap()).unwrap().with_limit(Some(1));
        assert_eq!(set.len(), 1);
        assert_eq!(set.get(0).unwrap().id, "digits.csv#0");

        fs::write(&path, "1,2,3\n1,2,3\n").unwrap();
        let err = DataSet::open(path.to_str().unwrap()).unwrap_err();
        assert!(matches!(err, DataError::BadCsv { line: 1, .. }), "{err}");
    }

    #[test]
    fn several_specs_get_prefixes_that_keep_ids_unique() {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["fmnist", "mnist"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
            std::fs::write(dir.path().join(sub).join("00000.png"), b"x").unwrap();
        }
        let spec = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
        let specs = [spec("fmnist"), spec("mnist/")];
        let ids: Vec<String> = specs
            .iter()
            .zip(id_prefixes(&specs))
            .map(|(s, p)| DataSet::open(s).unwrap().with_id_prefix(p).get(0).unwrap().id)
            .collect();
        assert_eq!(ids, [spec("fmnist/00000.png"), spec("mnist/00000.png")]);
        // A file SPEC's id is the path as given.
        let specs = [spec("fmnist/00000.png"), spec("mnist")];
        let prefix = id_prefixes(&specs)[0].clone();
        assert_eq!(DataSet::open(&specs[0]).unwrap().with_id_prefix(prefix).get(0).unwrap().id, specs[0]);
        // Relative SPECs stay relative; one SPEC: no prefix.
        assert_eq!(id_prefixes(&["a.idx.gz".into(), "b/c.csv".into()]), [None, Some("b".to_string())]);
        assert_eq!(id_prefixes(&[spec("fmnist")]), [None]);
    }

    #[test]
    fn folders_are_recursive_sorted_and_skip_non_images() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("b")).unwrap();
        for name in ["b/z.png", "a.JPG", "b/a.gif", "notes.txt", ".hidden.png"] {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        let set = DataSet::open(dir.path().to_str().unwrap()).unwrap();
        let ids: Vec<String> = set.iter().map(|i| i.unwrap().id).collect();
        assert_eq!(ids, ["a.JPG", "b/a.gif", "b/z.png"]);
        assert_eq!(set.ignored_files, 1);
    }

    #[test]
    fn missing_path_and_empty_folder_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(DataSet::open("/nonexistent/x"), Err(DataError::NotFound { .. })));
        assert!(matches!(DataSet::open(dir.path().to_str().unwrap()), Err(DataError::NoImages { .. })));
    }

    #[test]
    fn a_record_sets_variant_keeps_classes_and_numbers_and_transforms_the_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("x-images-idx3-ubyte");
        write_idx(&images, 4, 2, 2, false);
        let spec = |options: &str| format!("{}?{options}", images.display());
        let err = DataSet::open(&spec("classes=5")).unwrap_err().to_string();
        assert!(err.contains("labels-idx1"), "no labels file: {err}");
        let mut labels = vec![0, 0, 8, 1, 0, 0, 0, 4];
        labels.extend([5, 1, 5, 2]);
        fs::write(dir.path().join("x-labels-idx1-ubyte"), labels).unwrap();
        let fives = DataSet::open(&spec("classes=5")).unwrap();
        let ids: Vec<String> = fives.iter().map(|i| i.unwrap().id).collect();
        assert_eq!(ids, ["x-images-idx3-ubyte#0", "x-images-idx3-ubyte#2"], "ids keep the record numbers");
        assert_eq!(DataSet::open(&spec("from=1&classes=5")).unwrap().len(), 1);
        let grey = |set: &DataSet, i: usize| match set.get(i).unwrap().content {
            ItemContent::Grey { pixels, .. } => pixels,
            _ => panic!("records are grey"),
        };
        // Record 2 holds pixels 8, 9, 10, 11 (2 x 2); upside down: 10, 11, 8, 9.
        assert_eq!(grey(&fives, 1), [8, 9, 10, 11]);
        assert_eq!(grey(&DataSet::open(&spec("classes=5&flip=v")).unwrap(), 1), [10, 11, 8, 9]);
        assert_ne!(
            fives.fingerprint().unwrap(),
            DataSet::open(&spec("classes=5&flip=v")).unwrap().fingerprint().unwrap()
        );
        assert!(DataSet::open(&spec("classes=7")).unwrap_err().to_string().contains("no record is left"));
        let folder = format!("{}?rotate=3", dir.path().display());
        assert!(DataSet::open(&folder).unwrap_err().to_string().contains("IDX and CSV"));
    }
}
