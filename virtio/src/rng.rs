//! virtio-rng, the entropy device (virtio 1.2 §5.4): one queue; every writable buffer the
//! driver posts is filled from an [`EntropySource`] (by default the host's `getrandom`).

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestMemoryMmap};

use crate::device::{Activation, DeviceError, VirtioDevice};
use crate::memory::VirtioMemory;
use crate::queue_pass::ChainOutcome;
use crate::spec::{VIRTIO_F_VERSION_1, VIRTIO_ID_RNG, VIRTIO_RING_F_EVENT_IDX};

/// Queue size the device offers.
pub const RNG_QUEUE_SIZE: u16 = 256;
/// Most bytes filled per chain (bounds the work one guest request can cause).
pub const RNG_MAX_CHAIN_BYTES: u32 = 64 * 1024;

/// Where the random bytes come from.
pub trait EntropySource: Send {
    /// Fill `buf` completely.
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<()>;
}

/// The host's `getrandom(2)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostEntropy;

impl EntropySource for HostEntropy {
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        getrandom::fill(buf).map_err(std::io::Error::other)
    }
}

/// Counters of the entropy device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngMetrics {
    /// Chains completed.
    pub requests: u64,
    /// Random bytes written to the guest.
    pub bytes: u64,
    /// Descriptors skipped: read-only, or outside guest memory.
    pub bad_descriptors: u64,
    /// Entropy source failures (the chain is returned with what was written so far).
    pub source_errors: u64,
}

/// The virtio entropy device.
///
/// ```
/// use vmkit_virtio::{rng::Rng, test_utils::{Desc, DriverHarness}, spec::VIRTIO_F_VERSION_1};
///
/// let mut h = DriverHarness::new(Rng::default());
/// h.activate(1 << VIRTIO_F_VERSION_1).unwrap();
/// let chain = h.add_chain(0, &[Desc::Writable(32)]).unwrap();
/// h.kick(0);
/// assert_eq!(h.used(0), [(chain.head, 32)]);
/// assert_eq!(h.device().metrics().bytes, 32);
/// ```
pub struct Rng<M = GuestMemoryMmap, E = HostEntropy> {
    source: E,
    active: Option<Activation<M>>,
    metrics: RngMetrics,
}

impl<M> Default for Rng<M, HostEntropy> {
    fn default() -> Self {
        Self::new(HostEntropy)
    }
}

impl<M, E> Rng<M, E> {
    /// An entropy device reading from `source`.
    pub fn new(source: E) -> Self {
        Self {
            source,
            active: None,
            metrics: RngMetrics::default(),
        }
    }

    /// Counters.
    pub fn metrics(&self) -> RngMetrics {
        self.metrics
    }
}

impl<M: VirtioMemory, E: EntropySource> Rng<M, E> {
    fn serve(&mut self) -> Result<(), DeviceError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let (source, m) = (&mut self.source, &mut self.metrics);
        let mut buf = Vec::new();
        active.run_queue(0, |chain| {
            let mem = chain.memory();
            let mut written = 0u32;
            for desc in chain.clone() {
                if !desc.is_write_only() {
                    m.bad_descriptors += 1;
                    continue;
                }
                let len = desc.len().min(RNG_MAX_CHAIN_BYTES - written);
                buf.resize(len as usize, 0);
                if source.fill(&mut buf).is_err() {
                    m.source_errors += 1;
                    break;
                }
                if mem.write_slice(&buf, desc.addr()).is_err() {
                    m.bad_descriptors += 1;
                    continue;
                }
                written += len;
                if written >= RNG_MAX_CHAIN_BYTES {
                    break;
                }
            }
            m.requests += 1;
            m.bytes += written as u64;
            ChainOutcome::Used(written)
        })?;
        Ok(())
    }
}

impl<M, E> VirtioDevice<M> for Rng<M, E>
where
    M: VirtioMemory,
    E: EntropySource,
{
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn device_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[RNG_QUEUE_SIZE]
    }

    fn activate(&mut self, activation: Activation<M>) -> Result<(), DeviceError> {
        self.active = Some(activation);
        Ok(())
    }

    fn queue_notify(&mut self, _queue: u16) -> Result<(), DeviceError> {
        self.serve()
    }

    fn reset(&mut self) {
        self.active = None;
    }
}
