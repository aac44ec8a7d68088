//! `dlsr features`: encode a data set into DLSR feature vectors, report throughput and
//! skipped items, and optionally save them (safetensors with ids and identity metadata).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::{DataArgs, EncoderArgs};
use crate::data::DataSet;
use crate::encode::{encode_set, EncodeOptions};

#[derive(Debug, Args)]
pub struct FeaturesArgs {
    /// Data: an image file, a folder of images, an IDX file or an MNIST-style CSV.
    #[arg(long)]
    pub data: String,
    /// Write the features here (safetensors: `features` [N, D], `offsets`; ids in metadata).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub encoder: EncoderArgs,
    #[command(flatten)]
    pub data_opts: DataArgs,
}

pub fn run(args: &FeaturesArgs, quiet: bool) -> anyhow::Result<()> {
    // The device first: asking for CUDA where there is none fails before anything loads.
    args.encoder.device.resolve()?;
    let set = DataSet::open(&args.data)?.with_limit(args.data_opts.limit);
    let extractor = args.encoder.build()?;
    let opts = EncodeOptions { batch_size: args.encoder.batch_size, limits: args.data_opts.limits(), quiet };
    let encoded = encode_set(&extractor, &set, &opts).with_context(|| format!("encoding {}", args.data))?;
    let identity = extractor.encoder.identity();
    let n = encoded.ids.len();
    println!(
        "encoder: {} ({} layers, sha256 {}) on {}",
        identity.name,
        encoded.offsets.layers(),
        &identity.weights_sha256[..12],
        crate::device::describe(extractor.encoder.device())
    );
    println!("input: {} px, {:?}", extractor.preprocess.size, extractor.preprocess.resize);
    println!("items: {n} encoded, {} skipped {:?}", encoded.skipped.len(), encoded.skipped_by_code());
    if set.ignored_files > 0 {
        println!("ignored: {} non-image files in the folder", set.ignored_files);
    }
    println!("features: {} values per item, layer offsets {:?}", encoded.offsets.dim(), encoded.offsets.0);
    println!("time: {:.2}s ({:.1} images/s)", encoded.seconds, n as f64 / encoded.seconds.max(1e-9));
    if let Some(out) = &args.out {
        let offsets = tch::Tensor::from_slice(&encoded.offsets.0);
        let meta = BTreeMap::from([
            ("ids".to_string(), serde_json::to_string(&encoded.ids)?),
            ("encoder".to_string(), serde_json::to_string(identity)?),
            ("preprocess".to_string(), serde_json::to_string(&extractor.preprocess)?),
        ]);
        crate::tensor_file::write(out, &[("features", &encoded.values), ("offsets", &offsets)], &meta)?;
        println!("wrote {}", out.display());
    }
    if n == 0 {
        anyhow::bail!("no item of {} could be encoded", args.data);
    }
    Ok(())
}
