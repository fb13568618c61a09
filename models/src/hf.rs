//! Hugging Face checkpoints in and out: `safetensors` files and GPT-2 folders.
//!
//! A `GPT2LMHeadModel` folder holds `config.json` (the shape: `model_type` "gpt2", `vocab_size`,
//! `n_positions`, `n_embd`, `n_layer`, `n_head`, `n_inner`, `layer_norm_epsilon`,
//! `activation_function`, `tie_word_embeddings`) and `model.safetensors`: an 8-byte little-endian
//! header length N, N bytes of JSON (`name → {dtype, shape, data_offsets}`, plus
//! `__metadata__`), then the tensors' bytes, little-endian, row-major. GPT-2's linear layers
//! ("Conv1D") store their weight `[in, out]`, the layout culprit uses, so importing is a naming
//! table ([`GptConfig::tensors`]), not a conversion. The LM head is tied to the token embedding
//! and absent from the file (when present it must equal it).

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use crate::ModelError;
use crate::gpt::GptConfig;

fn bad(path: &Path, message: impl std::fmt::Display) -> ModelError {
    ModelError::Config(format!("{}: {message}", path.display()))
}

/// A tensor from a safetensors file: shape and values widened to f64.
pub type Named = (Vec<usize>, Vec<f64>);

/// Reads every tensor of a safetensors file (F32, F64, F16 or BF16), checking every offset.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Named>, ModelError> {
    let bytes = std::fs::read(path).map_err(|e| bad(path, e))?;
    let n = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize);
    let header = n
        .and_then(|n| bytes.get(8..8usize.checked_add(n)?))
        .ok_or_else(|| bad(path, "not a safetensors file (truncated header)"))?;
    let data = &bytes[8 + header.len()..];
    let header: HashMap<String, Value> =
        serde_json::from_slice(header).map_err(|e| bad(path, format!("not a safetensors file: {e}")))?;
    let mut out = HashMap::new();
    for (name, info) in header.into_iter().filter(|(n, _)| n != "__metadata__") {
        let dtype = info["dtype"].as_str().unwrap_or("");
        let shape: Vec<usize> = info["shape"]
            .as_array()
            .map(|a| a.iter().filter_map(|d| d.as_u64().map(|d| d as usize)).collect())
            .unwrap_or_default();
        let offsets: Vec<usize> = info["data_offsets"]
            .as_array()
            .map(|a| a.iter().filter_map(|d| d.as_u64().map(|d| d as usize)).collect())
            .unwrap_or_default();
        let [start, end] = offsets[..] else { return Err(bad(path, format!("tensor `{name}` has no data_offsets"))) };
        let raw = data
            .get(start..end)
            .filter(|_| start <= end)
            .ok_or_else(|| bad(path, format!("tensor `{name}` runs past the end of the file")))?;
        let size = match dtype {
            "F64" => 8,
            "F32" => 4,
            "F16" | "BF16" => 2,
            other => {
                return Err(bad(
                    path,
                    format!("tensor `{name}` has dtype {other}; culprit reads F32, F64, F16 and BF16"),
                ));
            }
        };
        let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).unwrap_or(usize::MAX);
        if count.checked_mul(size) != Some(raw.len()) {
            return Err(bad(path, format!("tensor `{name}` of shape {shape:?} ({dtype}) holds {} bytes", raw.len())));
        }
        let values = raw
            .chunks_exact(size)
            .map(|c| match dtype {
                "F64" => f64::from_le_bytes(c.try_into().expect("8")),
                "F32" => f64::from(f32::from_le_bytes(c.try_into().expect("4"))),
                "F16" => f64::from(half_to_f32(u16::from_le_bytes(c.try_into().expect("2")))),
                _ => f64::from(f32::from_bits(u32::from(u16::from_le_bytes(c.try_into().expect("2"))) << 16)),
            })
            .collect();
        out.insert(name, (shape, values));
    }
    Ok(out)
}

/// IEEE binary16 to f32.
fn half_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exponent = (h >> 10) & 0x1f;
    let mantissa = u32::from(h & 0x3ff);
    let bits = match exponent {
        0 if mantissa == 0 => sign,
        0 => {
            // Subnormal: normalise.
            let shift = mantissa.leading_zeros() - 21;
            sign | ((113 - shift) << 23) | ((mantissa << shift) & 0x3ff) << 13
        }
        31 => sign | 0x7f80_0000 | (mantissa << 13),
        e => sign | ((u32::from(e) + 112) << 23) | (mantissa << 13),
    };
    f32::from_bits(bits)
}

/// The bytes of a safetensors file holding `tensors` as F32, in the order given.
pub fn encode_safetensors(tensors: &[(String, Vec<usize>, &[f64])]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0usize;
    for (name, shape, values) in tensors {
        let end = offset + 4 * values.len();
        header
            .insert(name.clone(), serde_json::json!({ "dtype": "F32", "shape": shape, "data_offsets": [offset, end] }));
        offset = end;
    }
    let mut json = serde_json::to_vec(&header).expect("plain data");
    // The data starts 8-byte aligned, as the reference writer pads its header with spaces.
    json.resize((8 + json.len()).next_multiple_of(8) - 8, b' ');
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for (_, _, values) in tensors {
        values.iter().for_each(|v| out.extend_from_slice(&(*v as f32).to_le_bytes()));
    }
    out
}

/// A GPT-2 shape from a `config.json`, refusing other architectures with the reason.
pub fn gpt_config(path: &Path) -> Result<GptConfig, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| bad(path, e))?;
    let c: Value = serde_json::from_str(&text).map_err(|e| bad(path, format!("not JSON: {e}")))?;
    let model_type = c["model_type"].as_str().unwrap_or("(none)");
    if model_type != "gpt2" {
        return Err(bad(path, format!("model_type is `{model_type}`; culprit imports GPT-2 (`gpt2`) models")));
    }
    let size = |key: &str| -> Result<usize, ModelError> {
        c[key]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| bad(path, format!("`{key}` is missing or not a positive integer")))
    };
    let activation = c["activation_function"].as_str().unwrap_or("gelu_new");
    if activation != "gelu_new" {
        return Err(bad(path, format!("activation_function is `{activation}`; culprit's GPT uses gelu_new")));
    }
    if c["tie_word_embeddings"].as_bool() == Some(false) {
        return Err(bad(path, "tie_word_embeddings is false; culprit's GPT ties the LM head to the token embedding"));
    }
    let width = size("n_embd")?;
    let config = GptConfig {
        vocab: size("vocab_size")?,
        context: size("n_positions")?,
        width,
        layers: size("n_layer")?,
        heads: size("n_head")?,
        inner: c["n_inner"].as_u64().map_or(4 * width, |v| v as usize),
        epsilon: c["layer_norm_epsilon"].as_f64().unwrap_or(1e-5),
    };
    config.validate().map_err(|e| bad(path, e))?;
    Ok(config)
}

/// Imports a `GPT2LMHeadModel` folder: its shape and θ in culprit's order.
pub fn import_gpt(dir: &Path) -> Result<(GptConfig, Vec<f64>), ModelError> {
    let config = gpt_config(&dir.join("config.json"))?;
    let weights = dir.join("model.safetensors");
    let mut tensors = read_safetensors(&weights)?;
    let mut theta = Vec::with_capacity(config.num_params());
    for (name, shape) in config.tensors() {
        let short = name.trim_start_matches("transformer.");
        let (stored, values) = tensors
            .remove(&name)
            .or_else(|| tensors.remove(short))
            .ok_or_else(|| bad(&weights, format!("tensor `{name}` is missing")))?;
        if stored != shape {
            return Err(bad(&weights, format!("tensor `{name}` has shape {stored:?}; config.json implies {shape:?}")));
        }
        theta.extend(values);
    }
    if let Some((_, head)) = tensors.remove("lm_head.weight") {
        let wte = &theta[..config.vocab * config.width];
        if head.len() != wte.len() || head.iter().zip(wte).any(|(a, b)| a != b) {
            return Err(bad(&weights, "lm_head.weight differs from transformer.wte.weight; culprit's GPT ties them"));
        }
    }
    Ok((config, theta))
}

/// The `config.json` of a `GPT2LMHeadModel` of this shape.
pub fn gpt_config_json(config: &GptConfig) -> String {
    let json = serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": config.vocab,
        "n_positions": config.context,
        "n_embd": config.width,
        "n_layer": config.layers,
        "n_head": config.heads,
        "n_inner": config.inner,
        "layer_norm_epsilon": config.epsilon,
        "tie_word_embeddings": true,
        "attn_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "scale_attn_weights": true,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": "float32",
    });
    serde_json::to_string_pretty(&json).expect("plain data") + "\n"
}

/// The `model.safetensors` of θ (F32, Hugging Face's names, the LM head left tied).
pub fn gpt_safetensors(config: &GptConfig, theta: &[f64]) -> Vec<u8> {
    let mut offset = 0;
    let tensors: Vec<(String, Vec<usize>, &[f64])> = config
        .tensors()
        .into_iter()
        .map(|(name, shape)| {
            let len: usize = shape.iter().product();
            let values = &theta[offset..offset + len];
            offset += len;
            (name, shape, values)
        })
        .collect();
    encode_safetensors(&tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_values_decode_exactly() {
        for (bits, value) in [
            (0x3c00u16, 1.0f32),
            (0xc000, -2.0),
            (0x0001, 5.960_464_5e-8),
            (0x7bff, 65504.0),
            (0, 0.0),
            (0x0003, 1.788_139_3e-7),
            (0x03ff, 6.097_555_2e-5),
        ] {
            assert_eq!(half_to_f32(bits), value, "{bits:#06x}");
        }
    }

    #[test]
    fn safetensors_round_trip_and_damage_is_named() {
        let dir = std::env::temp_dir().join(format!("culprit-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.safetensors");
        let a = [1.5, -2.0, 3.25, 0.0];
        std::fs::write(&path, encode_safetensors(&[("a".into(), vec![2, 2], &a)])).unwrap();
        let t = read_safetensors(&path).unwrap();
        assert_eq!(t["a"], (vec![2, 2], a.to_vec()));
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert!(read_safetensors(&path).unwrap_err().to_string().contains("runs past the end of the file"));
        // A shape that does not match its bytes: [2, 2] declared over three values.
        std::fs::write(&path, encode_safetensors(&[("a".into(), vec![2, 2], &a[..3])])).unwrap();
        let err = read_safetensors(&path).unwrap_err().to_string();
        assert!(err.contains("shape [2, 2] (F32) holds 12 bytes"), "{err}");
        std::fs::write(&path, &bytes[..5]).unwrap();
        assert!(read_safetensors(&path).unwrap_err().to_string().contains("truncated header"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
