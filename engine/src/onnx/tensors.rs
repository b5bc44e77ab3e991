//! Reading initializer data (embedded or external) as f32 matrices in moe-edge's layouts.

use std::path::Path;

use tract_onnx::pb::TensorProto;

use super::graph::GraphIndex;
use super::patterns::LinearRef;
use crate::error::{Error, Result};

/// Loads an initializer as f32 values (converting from f16/bf16/f64 if needed).
pub fn load_f32(
    g: &GraphIndex,
    name: &str,
    model_dir: Option<&Path>,
) -> Result<(Vec<usize>, Vec<f32>)> {
    let proto: &TensorProto = g
        .initializer(name)
        .ok_or_else(|| Error::InvalidInput(format!("initializer '{name}' not found")))?;
    let resolver = tract_onnx::data_resolver::default();
    let dir = model_dir.and_then(|d| d.to_str());
    let tensor = tract_onnx::tensor::load_tensor(&*resolver, proto, dir)
        .map_err(Error::tract(format!("loading initializer '{name}'")))?;
    let values = tensor
        .cast_to::<f32>()
        .and_then(|t| Ok(t.try_as_plain_ram()?.as_slice::<f32>()?.to_vec()))
        .map_err(Error::tract(format!(
            "converting initializer '{name}' to f32"
        )))?;
    Ok((tensor.shape().to_vec(), values))
}

/// Reads `count` values of an initializer, from flat element `start` on, as f32, without
/// loading the rest: from its external data file by one positioned read, or from its embedded
/// bytes. Packing reads one expert at a time this way. f32 and f16 data are read so; any other
/// type or storage is loaded whole by [`load_f32`] and sliced.
pub fn load_f32_range(
    g: &GraphIndex,
    name: &str,
    model_dir: Option<&Path>,
    start: usize,
    count: usize,
) -> Result<Vec<f32>> {
    let proto: &TensorProto = g
        .initializer(name)
        .ok_or_else(|| Error::InvalidInput(format!("initializer '{name}' not found")))?;
    let elements = initializer_elements(g, name)?;
    let end = start
        .checked_add(count)
        .filter(|&e| e <= elements)
        .ok_or_else(|| {
            Error::UnsupportedGraph(format!(
                "'{name}' has {elements} values, {count} from {start} were asked for"
            ))
        })?;
    const FLOAT: i32 = 1;
    const FLOAT16: i32 = 10;
    let size = match proto.data_type {
        FLOAT => 4,
        FLOAT16 => 2,
        _ => return whole_then_slice(g, name, model_dir, start, end),
    };
    let external =
        proto.data_location == Some(tract_onnx::pb::tensor_proto::DataLocation::External as i32);
    let bytes = if external {
        let ext = ExternalData::of(proto, model_dir)?;
        let want = (count * size) as u64;
        let at = (start * size) as u64;
        if ext.length.is_some_and(|l| at + want > l) {
            return Err(Error::UnsupportedGraph(format!(
                "'{name}': its external data is shorter than its dims say"
            )));
        }
        let file = std::fs::File::open(&ext.path).map_err(Error::io(&ext.path))?;
        let mut bytes = vec![0u8; want as usize];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, ext.offset + at).map_err(
            |e| {
                Error::UnsupportedGraph(format!(
                    "'{name}': reading {want} bytes of {} at {}: {e}",
                    ext.path.display(),
                    ext.offset + at
                ))
            },
        )?;
        bytes
    } else if !proto.raw_data.is_empty() {
        // the size of embedded bytes is checked against the dims when the graph is read
        proto.raw_data[start * size..end * size].to_vec()
    } else if proto.data_type == FLOAT && proto.float_data.len() == elements {
        return Ok(proto.float_data[start..end].to_vec());
    } else {
        return whole_then_slice(g, name, model_dir, start, end);
    };
    Ok(if size == 4 {
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    } else {
        bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()
    })
}

/// Values `start..end` of an initializer loaded whole.
fn whole_then_slice(
    g: &GraphIndex,
    name: &str,
    model_dir: Option<&Path>,
    start: usize,
    end: usize,
) -> Result<Vec<f32>> {
    let (_, all) = load_f32(g, name, model_dir)?;
    all.get(start..end).map(<[f32]>::to_vec).ok_or_else(|| {
        Error::UnsupportedGraph(format!(
            "'{name}' holds {} values, fewer than its dims say",
            all.len()
        ))
    })
}

/// How many values the initializer `name` holds, by its dims.
pub fn initializer_elements(g: &GraphIndex, name: &str) -> Result<usize> {
    let proto: &TensorProto = g
        .initializer(name)
        .ok_or_else(|| Error::InvalidInput(format!("initializer '{name}' not found")))?;
    proto
        .dims
        .iter()
        .try_fold(1usize, |n, &d| usize::try_from(d).ok()?.checked_mul(n))
        .ok_or_else(|| Error::UnsupportedGraph(format!("'{name}' has dims {:?}", proto.dims)))
}

/// Where an initializer's external data is: a file inside the model's directory, an offset and
/// (when given) a length.
pub(crate) struct ExternalData {
    pub path: std::path::PathBuf,
    pub offset: u64,
    pub length: Option<u64>,
}

impl ExternalData {
    /// Reads the `external_data` entries of `proto`. The location must be a relative path that
    /// stays inside the model's directory (no `..`, not absolute), as onnxruntime requires.
    pub(crate) fn of(proto: &TensorProto, model_dir: Option<&Path>) -> Result<ExternalData> {
        let name = &proto.name;
        let bad = |why: String| Error::UnsupportedGraph(format!("initializer '{name}': {why}"));
        let kv = |k: &str| {
            proto
                .external_data
                .iter()
                .find(|e| e.key == k)
                .map(|e| e.value.as_str())
        };
        let location =
            kv("location").ok_or_else(|| bad("external data without a location".into()))?;
        let rel = Path::new(location);
        let inside = rel.components().all(|c| {
            matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        });
        if location.is_empty() || !inside {
            return Err(bad(format!(
                "external data location '{location}' is not a path inside the model's directory"
            )));
        }
        let number = |k: &str| -> Result<Option<u64>> {
            kv(k)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| bad(format!("external data {k} '{v}' is not a number")))
                })
                .transpose()
        };
        Ok(ExternalData {
            path: model_dir.unwrap_or(Path::new(".")).join(rel),
            offset: number("offset")?.unwrap_or(0),
            length: number("length")?,
        })
    }
}

/// Loads a linear layer's weight as `[out, in]` row-major.
pub fn load_linear_out_in(
    g: &GraphIndex,
    linear: &LinearRef,
    model_dir: Option<&Path>,
) -> Result<Vec<f32>> {
    let (_, w) = load_f32(g, &linear.weight, model_dir)?;
    Ok(if linear.in_out_layout {
        transpose(&w, linear.dims[0], linear.dims[1])
    } else {
        w
    })
}

/// Transposes a row-major `[rows, cols]` matrix.
pub fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; m.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = m[r * cols + c];
        }
    }
    t
}

/// Element sizes of the ONNX data types tract loads; others (strings, bfloat16, complex,
/// float8...) are refused before tract sees them.
pub(crate) fn element_bytes(data_type: i32) -> Option<u64> {
    match data_type {
        2 | 3 | 9 => Some(1),   // uint8, int8, bool
        4 | 5 | 10 => Some(2),  // uint16, int16, float16
        1 | 6 | 12 => Some(4),  // float, int32, uint32
        7 | 11 | 13 => Some(8), // int64, double, uint64
        _ => None,
    }
}

/// Checks every constant tensor of the graph (initializers and `Constant` nodes) before tract
/// loads it: a data type tract reads, non-negative dims of a sane size, and embedded bytes that
/// match the dims. A damaged file is an error naming the tensor, not a panic inside tract.
pub(crate) fn check_constant_tensors(graph: &tract_onnx::pb::GraphProto) -> Result<()> {
    let node_tensors = graph
        .node
        .iter()
        .flat_map(|n| {
            n.attribute
                .iter()
                .filter_map(move |a| a.t.as_ref().map(|t| (n, t)))
        })
        .map(|(n, t)| (format!("the tensor of node '{}'", n.name), t));
    let initializers = graph
        .initializer
        .iter()
        .map(|t| (format!("initializer '{}'", t.name), t));
    for (what, t) in initializers.chain(node_tensors) {
        let bad = |why: String| Error::UnsupportedGraph(format!("{what}: {why}"));
        let size = element_bytes(t.data_type)
            .ok_or_else(|| bad(format!("data type {} is not supported", t.data_type)))?;
        let mut elements: u64 = 1;
        for &d in &t.dims {
            let d = u64::try_from(d).map_err(|_| bad(format!("negative dimension {d}")))?;
            elements = elements
                .checked_mul(d)
                .filter(|&e| e <= 1 << 40)
                .ok_or_else(|| bad(format!("dims {:?} are too large", t.dims)))?;
        }
        if !t.raw_data.is_empty() && t.raw_data.len() as u64 != elements * size {
            return Err(bad(format!(
                "{} bytes of data for dims {:?} ({} expected)",
                t.raw_data.len(),
                t.dims,
                elements * size
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::pb::{tensor_proto::DataLocation, GraphProto, StringStringEntryProto};

    fn external(
        name: &str,
        data_type: i32,
        dims: &[i64],
        location: &str,
        offset: u64,
    ) -> TensorProto {
        let kv = |k: &str, v: String| StringStringEntryProto {
            key: k.into(),
            value: v,
        };
        TensorProto {
            name: name.into(),
            data_type,
            dims: dims.to_vec(),
            data_location: Some(DataLocation::External as i32),
            external_data: vec![
                kv("location", location.into()),
                kv("offset", offset.to_string()),
            ],
            ..Default::default()
        }
    }

    fn with_length(mut t: TensorProto, length: u64) -> TensorProto {
        t.external_data.push(StringStringEntryProto {
            key: "length".into(),
            value: length.to_string(),
        });
        t
    }

    /// Every way a tensor's values can be stored, read by ranges, equals tract's whole load
    /// sliced (f16 also equals the values converted by hand).
    #[test]
    fn ranges_equal_the_whole_tensor_sliced_for_every_storage() {
        let dir = std::env::temp_dir().join(format!("moe-edge-ranges-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let values: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        let halves: Vec<half::f16> = values.iter().map(|&v| half::f16::from_f32(v)).collect();
        let mut data = vec![0xAAu8; 16]; // an offset that is not zero
        data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        let f16_at = data.len() as u64;
        data.extend(halves.iter().flat_map(|v| v.to_le_bytes()));
        std::fs::write(dir.join("w.data"), &data).unwrap();
        let graph = GraphProto {
            initializer: vec![
                with_length(external("ext32", 1, &[4, 6], "w.data", 16), 96),
                with_length(external("ext16", 10, &[4, 6], "./w.data", f16_at), 48),
                TensorProto {
                    name: "raw32".into(),
                    data_type: 1,
                    dims: vec![4, 6],
                    raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    ..Default::default()
                },
                TensorProto {
                    name: "float_data".into(),
                    data_type: 1,
                    dims: vec![4, 6],
                    float_data: values.clone(),
                    ..Default::default()
                },
                TensorProto {
                    name: "f64".into(),
                    data_type: 11,
                    dims: vec![4, 6],
                    double_data: values.iter().map(|&v| v as f64).collect(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let g = GraphIndex::new(&graph);
        for name in ["ext32", "ext16", "raw32", "float_data", "f64"] {
            let (_, whole) = load_f32(&g, name, Some(&dir)).unwrap();
            assert_eq!(whole.len(), 24, "{name}");
            for (start, count) in [(0, 24), (6, 6), (18, 6), (5, 1), (24, 0)] {
                let part = load_f32_range(&g, name, Some(&dir), start, count).unwrap();
                assert_eq!(part, whole[start..start + count], "{name} {start}+{count}");
            }
        }
        let by_hand: Vec<f32> = halves.iter().map(|h| h.to_f32()).collect();
        assert_eq!(
            load_f32_range(&g, "ext16", Some(&dir), 0, 24).unwrap(),
            by_hand
        );
        assert_eq!(
            load_f32_range(&g, "ext32", Some(&dir), 0, 24).unwrap(),
            values
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Ranges past the dims, data shorter than the dims, and locations outside the model's
    /// directory are errors naming the tensor.
    #[test]
    fn bad_ranges_and_locations_are_refused() {
        let dir = std::env::temp_dir().join(format!("moe-edge-ranges-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("short.data"), [0u8; 40]).unwrap();
        let short = with_length(external("short", 1, &[4, 6], "short.data", 0), 40);
        let graph = GraphProto {
            initializer: vec![
                short,
                external("unlisted_length", 1, &[4, 6], "short.data", 0),
                external("up", 1, &[4, 6], "../short.data", 0),
                external("absolute", 1, &[4, 6], "/etc/passwd", 0),
                external("bad_offset", 1, &[4, 6], "short.data", 0),
            ],
            ..Default::default()
        };
        let mut graph = graph;
        graph.initializer[4].external_data[1].value = "-3".into();
        let g = GraphIndex::new(&graph);
        let err = |name: &str, start, count| {
            load_f32_range(&g, name, Some(&dir), start, count)
                .unwrap_err()
                .to_string()
        };
        assert!(
            err("short", 20, 5).contains("24 values, 5 from 20"),
            "{}",
            err("short", 20, 5)
        );
        assert!(err("short", 0, 24).contains("shorter than its dims"));
        // no length listed: the file's end is the limit
        assert!(err("unlisted_length", 0, 24).contains("short.data"));
        assert_eq!(
            load_f32_range(&g, "unlisted_length", Some(&dir), 0, 10)
                .unwrap()
                .len(),
            10
        );
        for name in ["up", "absolute"] {
            assert!(
                err(name, 0, 1).contains("not a path inside the model's directory"),
                "{name}"
            );
        }
        assert!(err("bad_offset", 0, 1).contains("offset '-3' is not a number"));
        assert!(err("missing", 0, 1).contains("'missing' not found"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
