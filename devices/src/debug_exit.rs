//! A debug-exit port: the guest writes a status code and the VM stops with it.
//!
//! The status is the value written (1, 2 or 4 bytes, little endian). The device only records the
//! request in a [`StopHandle`]; the run loop returns `RunOutcome::Stopped(status)` before the
//! next guest entry, and the VMM decides what the status means.

use vmkit_vcpu::StopHandle;

use crate::BusDevice;

/// The debug-exit device.
#[derive(Clone, Debug)]
pub struct DebugExit {
    stop: StopHandle,
}

impl DebugExit {
    /// A device that stops the VM through `stop`.
    pub fn new(stop: StopHandle) -> Self {
        Self { stop }
    }
}

impl BusDevice for DebugExit {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset != 0 || data.is_empty() || data.len() > 4 {
            return;
        }
        let mut v = [0u8; 4];
        v[..data.len()].copy_from_slice(data);
        self.stop.request(u32::from_le_bytes(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_widths() {
        for (bytes, status) in [
            (&[5u8][..], 5),
            (&[1, 2][..], 0x201),
            (&[1, 0, 0, 0x80][..], 0x8000_0001),
        ] {
            let stop = StopHandle::new();
            DebugExit::new(stop.clone()).write(0, bytes);
            assert_eq!(stop.requested(), Some(status));
        }
        let stop = StopHandle::new();
        let d = DebugExit::new(stop.clone());
        d.write(1, &[1]);
        d.write(0, &[1; 8]);
        d.write(0, &[]);
        assert_eq!(stop.requested(), None);
    }
}
