//! Device counters declared once: [`counters!`](crate::counters!) writes the atomic set a device
//! bumps from `&self`, the plain serde snapshot a VMM reads or logs, `add` (fold a tally kept
//! in a plain snapshot during a pass into the atomics: one atomic add per counter and pass, not
//! per request) and `snapshot`.

/// Declare a device's counters once.
///
/// `counters! { /// docs  pub struct Live => Snapshot { /// docs  name, ... } }` defines
/// `Live` (one `AtomicU64` per counter, `Default`, `Debug`), `Snapshot` (the same fields as
/// `u64`, `Copy`, `Eq`, serde), `Live::add(&self, &Snapshot)` and `Live::snapshot(&self)`. The
/// field docs are used for both. The calling crate needs `serde` with `derive`.
///
/// ```
/// vmkit_virtio::counters! {
///     /// Counters of a network device.
///     pub struct NetMetrics => NetMetricsSnapshot {
///         /// Frames received.
///         rx_frames,
///         /// Frames dropped for lack of buffers.
///         rx_dropped,
///     }
/// }
/// let m = NetMetrics::default();
/// let mut pass = NetMetricsSnapshot::default();
/// pass.rx_frames += 3;
/// m.add(&pass);
/// m.add(&NetMetricsSnapshot { rx_dropped: 1, ..Default::default() });
/// assert_eq!(m.snapshot(), NetMetricsSnapshot { rx_frames: 3, rx_dropped: 1 });
/// assert_eq!(serde_json::to_string(&m.snapshot()).unwrap(), r#"{"rx_frames":3,"rx_dropped":1}"#);
/// ```
#[macro_export]
macro_rules! counters {
    (
        $(#[$meta:meta])*
        $vis:vis struct $live:ident => $snap:ident {
            $( $(#[$fmeta:meta])* $field:ident ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        $vis struct $live {
            $( $(#[$fmeta])* pub $field: ::std::sync::atomic::AtomicU64, )*
        }

        #[doc = concat!("A plain copy of [`", stringify!($live), "`] for serialization.")]
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, ::serde::Serialize, ::serde::Deserialize)]
        $vis struct $snap {
            $( $(#[$fmeta])* pub $field: u64, )*
        }

        impl $live {
            /// Add counts tallied elsewhere (zeros cost nothing).
            #[inline]
            pub fn add(&self, d: &$snap) {
                $(
                    if d.$field != 0 {
                        self.$field.fetch_add(d.$field, ::std::sync::atomic::Ordering::Relaxed);
                    }
                )*
            }

            /// Copy every counter.
            pub fn snapshot(&self) -> $snap {
                $snap {
                    $( $field: self.$field.load(::std::sync::atomic::Ordering::Relaxed), )*
                }
            }
        }
    };
}
