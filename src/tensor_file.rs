//! Writing and reading safetensors files with string metadata (feature caches, bundles).
//! tch's own writer cannot store metadata, and ids and identities must travel with the
//! numbers, so the (simple, documented) format is written here directly.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum TensorFileError {
    // Not a `source` field: the message carries the OS error already, and a source would
    // print it twice in a chained report ("...: No such file ...: No such file ...").
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: tensor {name}: {reason}")]
    Tensor { path: PathBuf, name: String, reason: String },
}

fn dtype(kind: Kind) -> Option<(&'static str, usize)> {
    match kind {
        Kind::Float => Some(("F32", 4)),
        Kind::Double => Some(("F64", 8)),
        Kind::Int64 => Some(("I64", 8)),
        Kind::Int => Some(("I32", 4)),
        Kind::Uint8 => Some(("U8", 1)),
        _ => None,
    }
}

/// Writes `tensors` (moved to CPU, made contiguous) and `metadata` atomically: to a
/// temporary file first, renamed into place, so an interrupted write leaves nothing half-done.
pub fn write(
    path: &Path,
    tensors: &[(&str, &Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<(), TensorFileError> {
    let terr =
        |name: &str, reason: String| TensorFileError::Tensor { path: path.into(), name: name.into(), reason };
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata).unwrap_or_default());
    }
    let mut blobs = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for (name, t) in tensors {
        let (dt, elem) =
            dtype(t.kind()).ok_or_else(|| terr(name, format!("unsupported kind {:?}", t.kind())))?;
        let cpu = t
            .f_to_device(tch::Device::Cpu)
            .and_then(|t| t.f_contiguous())
            .map_err(|e| terr(name, e.to_string()))?;
        let numel = cpu.numel();
        let mut bytes = vec![0u8; numel * elem];
        cpu.f_copy_data_u8(&mut bytes, numel).map_err(|e| terr(name, e.to_string()))?;
        header.insert(
            (*name).to_string(),
            serde_json::json!({"dtype": dt, "shape": cpu.size(), "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
        blobs.push(bytes);
    }
    let mut head = serde_json::to_vec(&header)
        .map_err(|e| TensorFileError::Format { path: path.into(), reason: e.to_string() })?;
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let io = |error| TensorFileError::Io { path: path.into(), error };
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        f.write_all(&(head.len() as u64).to_le_bytes())?;
        f.write_all(&head)?;
        for b in &blobs {
            f.write_all(b)?;
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// Reads the string metadata of a safetensors file (header only).
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>, TensorFileError> {
    use std::io::Read;
    let fmt = |reason: String| TensorFileError::Format { path: path.into(), reason };
    let io = |error| TensorFileError::Io { path: path.into(), error };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| fmt("shorter than 8 bytes".into()))?;
    let n = u64::from_le_bytes(len);
    if n > file_len.saturating_sub(8) || n > 100 << 20 {
        return Err(fmt(format!("header length {n} does not fit the file")));
    }
    let mut head = vec![0u8; n as usize];
    f.read_exact(&mut head).map_err(io)?;
    let value: serde_json::Value = serde_json::from_slice(&head).map_err(|e| fmt(e.to_string()))?;
    let meta = value.get("__metadata__").cloned().unwrap_or_default();
    if meta.is_null() {
        return Ok(BTreeMap::new());
    }
    serde_json::from_value(meta).map_err(|e| fmt(format!("metadata: {e}")))
}

/// Reads all tensors (CPU).
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>, TensorFileError> {
    // Validate the header ourselves first: libtorch's reader reports damage tersely.
    read_metadata(path)?;
    Tensor::read_safetensors(path)
        .map(|v| v.into_iter().collect())
        .map_err(|e| TensorFileError::Format { path: path.into(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_tensors_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let a = Tensor::from_slice(&[1.5f32, -2.0, 3.0, 4.0]).view([2, 2]);
        let b = Tensor::from_slice(&[0i64, 16, 40]);
        let meta = BTreeMap::from([("ids".to_string(), "[\"a\",\"b\"]".to_string())]);
        write(&path, &[("a", &a), ("b", &b)], &meta).unwrap();
        assert_eq!(read_metadata(&path).unwrap(), meta);
        let back = read_tensors(&path).unwrap();
        assert!(back["a"].equal(&a));
        assert!(back["b"].equal(&b));
    }

    #[test]
    fn damaged_files_are_format_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\x7fxx").unwrap();
        assert!(matches!(read_metadata(&path), Err(TensorFileError::Format { .. })));
        std::fs::write(&path, b"abc").unwrap();
        assert!(matches!(read_tensors(&path), Err(TensorFileError::Format { .. })));
    }
}
