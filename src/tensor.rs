//! Tensors between the host and the device: [`HostTensor`] (f32, row-major, what files decode
//! to and what host linear algebra works on), reading device tensors back (always asynchronously:
//! the browser cannot block), and uploading host matrices.

use burn::tensor::{Device, Element, Int, Tensor, TensorData};

use crate::error::{Error, Result};

/// A tensor on the host: f32, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        HostTensor { shape, data }
    }

    /// The transpose of a 2-D tensor.
    pub fn transpose(&self) -> HostTensor {
        let (rows, cols) = (self.shape[0], self.shape[1]);
        let mut out = vec![0.0; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                out[c * rows + r] = self.data[r * cols + c];
            }
        }
        HostTensor::new(vec![cols, rows], out)
    }
}

/// Reads a tensor back to the host as f32.
pub async fn read_f32<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    values(t.into_data_async().await)
}

/// Reads an integer tensor back to the host as i32 (whatever integer type the backend keeps).
pub async fn read_i32<const D: usize>(t: Tensor<D, Int>) -> Result<Vec<i32>> {
    values(t.into_data_async().await.map(|data| data.convert::<i32>()))
}

/// The values of a read-back, or what went wrong.
fn values<E: Element, F: std::fmt::Debug>(read: std::result::Result<TensorData, F>) -> Result<Vec<E>> {
    let data = read.map_err(|e| Error::Backend(format!("reading a result back failed: {e:?}")))?;
    data.try_into_vec::<E>().map_err(|e| Error::Backend(format!("unexpected result type: {e:?}")))
}

/// Reads a tensor back as a host tensor of the same shape.
pub async fn read_host<const D: usize>(t: Tensor<D>) -> Result<HostTensor> {
    let shape = t.dims().to_vec();
    Ok(HostTensor::new(shape, read_f32(t).await?))
}

/// Reads a one-element tensor back as a number.
pub async fn read_scalar(t: Tensor<1>) -> Result<f64> {
    Ok(read_f32(t).await?[0] as f64)
}

/// A 2-D host matrix on `device` (taken, so its values move without a copy).
pub fn upload(t: HostTensor, device: &Device) -> Tensor<2> {
    let shape = [t.shape[0], t.shape[1]];
    Tensor::from_data(TensorData::new(t.data, shape), device)
}

/// Uploads several 2-D host matrices in one transfer: one device buffer, and each matrix a view
/// into it. On WebGPU every upload has a fixed cost that dwarfs a small LoRA matrix (an r=8 q,v
/// adapter of SmolLM2 loaded in ~100 ms one matrix at a time).
pub fn upload_all<'a>(ts: impl Iterator<Item = &'a HostTensor> + Clone, device: &Device) -> Vec<Tensor<2>> {
    let data: Vec<f32> = ts.clone().flat_map(|t| t.data.iter().copied()).collect();
    let total = data.len();
    let flat = Tensor::<1>::from_data(TensorData::new(data, [total]), device);
    let mut offset = 0;
    ts.map(|t| {
        let n = t.data.len();
        let view = flat.clone().slice(offset..offset + n).reshape([t.shape[0], t.shape[1]]);
        offset += n;
        view
    })
    .collect()
}
