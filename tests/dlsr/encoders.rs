//! The encoders on real data: ImageNet accuracy proves weights, padding and the forward
//! pass; feature layout and standardisation; the TorchScript contract.

use dlsr::data::{decode, DecodeLimits, Normalisation, Preprocess, ResizeMode};
use dlsr::model::efficientnet::{EfficientNetLite, LiteVariant};
use dlsr::model::encoder::{self, EncoderSpec, Precision};
use dlsr::model::features::FeatureExtractor;
use tch::{Device, Tensor};

use crate::common::{asset, imagenet_photos};

fn imagenet_top1(variant: LiteVariant) -> usize {
    let weights = asset(variant.default_weights());
    let net = EfficientNetLite::load(variant, &weights, Device::Cpu, Precision::F32).unwrap();
    let (correct, predicted) = dlsr::cli::doctor::imagenet_top1(&net, variant, &imagenet_photos()).unwrap();
    eprintln!("{}: {correct}/20 top-1 ({predicted:?})", variant.name());
    correct
}

#[test]
fn lite0_classifies_imagenet_photos() {
    let correct = imagenet_top1(LiteVariant::Lite0);
    assert!(correct >= 17, "Lite0 got {correct}/20 top-1; weights, padding or forward pass are wrong");
}

#[test]
fn lite2_classifies_imagenet_photos() {
    let correct = imagenet_top1(LiteVariant::Lite2);
    assert!(correct >= 17, "Lite2 got {correct}/20 top-1; weights, padding or forward pass are wrong");
}

/// The folded, channels-last network inference runs on must give the checkpoint's own
/// layers' feature maps, on real photos at 64 and 224 px and in odd sizes (where SAME
/// padding is asymmetric on every stride-2 layer), for both Lite variants.
#[test]
fn folded_encoder_matches_the_unfolded_layers() {
    let photos = imagenet_photos();
    for variant in [LiteVariant::Lite0, LiteVariant::Lite2] {
        let weights = asset(variant.default_weights());
        let net = EfficientNetLite::load(variant, &weights, Device::Cpu, Precision::F32).unwrap();
        for size in [64i64, 77, 224] {
            let pre = Preprocess {
                size,
                resize: ResizeMode::Stretch,
                normalisation: Normalisation::LITE,
                antialias: true,
            };
            let batch: Vec<Tensor> = photos[..3]
                .iter()
                .map(|(p, _)| {
                    let image = decode::decode(&std::fs::read(p).unwrap(), &DecodeLimits::default()).unwrap();
                    pre.apply(&image).unwrap()
                })
                .collect();
            let images = Tensor::stack(&batch, 0);
            let folded = dlsr::model::encoder::Encoder::feature_maps(&net, &images).unwrap();
            let reference = net.feature_maps_unfolded(&images).unwrap();
            assert_eq!(folded.len(), reference.len());
            for (layer, (a, b)) in folded.iter().zip(&reference).enumerate() {
                assert_eq!(a.size(), b.size(), "{} layer {layer} at {size} px", variant.name());
                // Relative to the layer's scale: activations reach tens.
                let scale = b.abs().max().double_value(&[]).max(1.0);
                let diff = (a - b).abs().max().double_value(&[]) / scale;
                assert!(
                    diff < 1e-4,
                    "{} layer {layer} at {size} px: max relative difference {diff}",
                    variant.name()
                );
            }
        }
    }
}

fn lite0_extractor(size: i64) -> FeatureExtractor {
    let spec: EncoderSpec = "lite0".parse().unwrap();
    asset(LiteVariant::Lite0.default_weights());
    let enc = encoder::load(&spec, None, Device::Cpu, Precision::F32).unwrap();
    let pre =
        Preprocess { size, resize: ResizeMode::Stretch, normalisation: Normalisation::LITE, antialias: true };
    FeatureExtractor::new(enc, pre)
}

#[test]
fn lite0_features_have_the_paper_layout_and_standardised_layers() {
    let extractor = lite0_extractor(224);
    let photos = imagenet_photos();
    let batch: Vec<Tensor> = photos[..4]
        .iter()
        .map(|(p, _)| {
            let img = decode::decode(&std::fs::read(p).unwrap(), &DecodeLimits::default()).unwrap();
            extractor.preprocess.apply(&img).unwrap()
        })
        .collect();
    let f = extractor.extract(&Tensor::stack(&batch, 0)).unwrap();
    assert_eq!(f.values.size(), [4, 512]);
    assert_eq!(f.offsets.0, vec![0, 16, 40, 80, 192, 512]);
    assert_eq!(
        extractor.encoder.identity().layers,
        ["_blocks.0", "_blocks.2", "_blocks.4", "_blocks.10", "_blocks.15"]
    );
    for l in 0..f.offsets.layers() {
        let (s, e) = f.offsets.range(l);
        let slice = f.values.narrow(1, s, e - s).to_kind(tch::Kind::Double);
        let mean = slice.mean_dim([1i64].as_slice(), false, None).abs().max().double_value(&[]);
        let std_err = (slice.std_dim([1i64].as_slice(), true, false) - 1.0).abs().max().double_value(&[]);
        assert!(mean < 1e-4, "layer {l}: |mean| {mean}");
        // (x - m) / (s + 1e-5) has std s / (s + 1e-5): within 1e-4 of 1 for s > 0.1.
        assert!(std_err < 1e-4, "layer {l}: |std - 1| {std_err}");
    }
}

#[test]
fn features_of_an_image_do_not_depend_on_its_batch() {
    let extractor = lite0_extractor(64);
    let photos = imagenet_photos();
    let imgs: Vec<Tensor> = photos[..3]
        .iter()
        .map(|(p, _)| {
            let img = decode::decode(&std::fs::read(p).unwrap(), &DecodeLimits::default()).unwrap();
            extractor.preprocess.apply(&img).unwrap()
        })
        .collect();
    let alone = extractor.extract(&imgs[1].unsqueeze(0)).unwrap().values;
    let batched = extractor.extract(&Tensor::stack(&imgs, 0)).unwrap().values.narrow(0, 1, 1);
    let diff = (alone - batched).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "batching changed a feature vector by {diff}");
}

#[test]
fn torchscript_fixture_encoder_returns_standardised_features() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_encoder.pt");
    let spec: EncoderSpec = path.to_str().unwrap().parse().unwrap();
    let enc = encoder::load(&spec, None, Device::Cpu, Precision::F32).unwrap();
    assert_eq!(enc.identity().layers.len(), 2);
    assert!(enc.identity().name.starts_with("torchscript:"));
    let pre = Preprocess {
        size: 32,
        resize: ResizeMode::Stretch,
        normalisation: Normalisation::IMAGENET,
        antialias: true,
    };
    let extractor = FeatureExtractor::new(enc, pre);
    let images = Tensor::randn([5, 3, 32, 32], (tch::Kind::Float, Device::Cpu));
    let f = extractor.extract(&images).unwrap();
    // The fixture taps a 4-channel and an 8-channel convolution (see its script).
    assert_eq!(f.offsets.0, vec![0, 4, 12]);
    assert_eq!(f.values.size(), [5, 12]);
    let slice = f.values.narrow(1, 4, 8);
    assert!(slice.mean_dim([1i64].as_slice(), false, None).abs().max().double_value(&[]) < 1e-4);
}

#[test]
fn torchscript_modules_breaking_the_contract_are_rejected_at_load() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let single = dir.join("single_tensor_encoder.pt");
    let spec: EncoderSpec = single.to_str().unwrap().parse().unwrap();
    let err = encoder::load(&spec, None, Device::Cpu, Precision::F32).err().expect("must be rejected");
    assert!(err.to_string().contains("single tensor"), "{err}");

    let tmp = tempfile::tempdir().unwrap();
    let junk = tmp.path().join("junk.pt");
    std::fs::write(&junk, b"not a torchscript archive").unwrap();
    let spec: EncoderSpec = junk.to_str().unwrap().parse().unwrap();
    let err = encoder::load(&spec, None, Device::Cpu, Precision::F32).err().expect("must be rejected");
    assert!(err.to_string().contains("not a usable TorchScript encoder"), "{err}");
}

#[test]
fn wrong_weights_for_the_architecture_are_a_clear_error() {
    let lite2_weights = asset(LiteVariant::Lite2.default_weights());
    let err = EfficientNetLite::load(LiteVariant::Lite0, &lite2_weights, Device::Cpu, Precision::F32)
        .err()
        .expect("Lite2 weights must not load into Lite0");
    assert!(err.to_string().contains("has shape"), "{err}");
}
