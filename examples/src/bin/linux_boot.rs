//! `linux_boot`: boot an unmodified Linux kernel (an uncompressed `vmlinux` ELF, the 64-bit
//! boot protocol) and report how far it gets, with vmkit-vcpu's userspace emulator taking every
//! instruction KVM gives up on.
//!
//! ```text
//! linux_boot VMLINUX [--seconds N] [--ram-mib M] [--cmdline "…"]
//! ```
//!
//! The machine: RAM below the 32-bit MMIO hole, identity page tables for the first 4 GiB, the
//! kernel loaded with vmkit-memory's `boot::load_elf` (linux-loader's ELF loader), the boot parameters (zero page) with the e820
//! map and the command line (`console=ttyS0 earlyprintk=ttyS0 …` by default), one vCPU in
//! 64-bit mode at the ELF entry with RSI pointing at the zero page (Documentation/arch/x86/
//! boot.rst, "64-bit boot protocol"), KVM's in-kernel irqchip and PIT, and a 16550 on COM1
//! whose output goes to stdout. Every `KVM_EXIT_INTERNAL_ERROR` emulation failure is handed to
//! `vmkit_vcpu::emulate::kvm::emulate_exit`; the guest goes on after the instruction.
//!
//! After `--seconds` (default 300) of wall time, or when the guest stops, the VMM prints the
//! milestones of the console it saw (first banner line, FPU set-up, alternatives, memory,
//! calibration, …) with the time each was reached, the instructions the emulator executed by
//! mnemonic, and exit counts. Exit status: 0 when it ran for its time or the guest reset or
//! powered off; 1 when the emulator refused an instruction (its disassembly is printed); 255
//! for a VMM error; 0x80 usage.
//!
//! Guest material is fetched at test time, never committed: `scripts/fetch-linux-guest.sh
//! DIR` writes `DIR/vmlinux` from Debian's `linux-image-6.12.*-cloud-amd64-unsigned`.
//!
//! Run: `cargo run --release -p vmkit-examples --bin linux_boot -- DIR/vmlinux --seconds 300`

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use vm_memory::{Bytes, GuestAddress};
use vmkit_devices::{IoBuses, interrupt::NoInterrupt, serial::Serial};
use vmkit_memory::{GuestLayout, PageSize, PageTableBuilder, paging::flags};
use vmkit_vcpu::emulate::{EmulationStats, Emulator, EventKind, Outcome, kvm::emulate_exit};
use vmkit_vcpu::{Exit, ExitStats, KvmVm, LongModeState, RunOutcome, StopHandle, run_until_exit};

/// Policy of this VMM: where things live.
const PAGE_TABLES: u64 = 0x9000; // 0x9000..0x10000
const ZERO_PAGE: u64 = 0x7000;
const CMDLINE: u64 = 0x2_0000;
const CMDLINE_MAX: usize = 4096;
const STACK_TOP: u64 = 0x8_0000;
const COM1: u16 = 0x3f8;
const DEFAULT_CMDLINE: &str =
    "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1 nokaslr lpj=5000000 no_timer_check";

/// Console lines that mark how far the boot got, in the order Linux prints them.
const MILESTONES: &[(&str, &str)] = &[
    ("Linux version", "banner"),
    ("Command line:", "command line"),
    ("BIOS-provided physical RAM map", "e820 map"),
    ("x86/fpu:", "FPU set-up"),
    ("Memory:", "memory map"),
    ("SLUB:", "slab allocator"),
    ("NR_IRQS", "IRQs"),
    ("Calibrating delay", "delay calibration"),
    ("Mount-cache", "VFS caches"),
    ("smpboot:", "SMP boot"),
    ("alternatives", "alternatives"),
    ("devtmpfs", "devtmpfs"),
    ("clocksource:", "clock source"),
    ("Serial: 8250", "8250 serial driver"),
    ("Freeing unused kernel", "end of init memory"),
    ("Run /init", "init"),
    ("Kernel panic", "kernel panic"),
];

/// What the console writer shares with the reporter: the milestones reached and when.
#[derive(Default)]
struct Console {
    line: Vec<u8>,
    reached: Vec<(&'static str, Duration)>,
    lines: u64,
}

struct ConsoleWriter {
    start: Instant,
    state: Arc<Mutex<Console>>,
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        out.write_all(buf)?;
        let mut c = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for &b in buf {
            if b != b'\n' {
                if c.line.len() < 4096 {
                    c.line.push(b);
                }
                continue;
            }
            c.lines += 1;
            let text = String::from_utf8_lossy(&c.line).into_owned();
            c.line.clear();
            for &(pattern, name) in MILESTONES {
                if text.contains(pattern) && !c.reached.iter().any(|(n, _)| *n == name) {
                    c.reached.push((name, self.start.elapsed()));
                }
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

struct Args {
    kernel: PathBuf,
    seconds: u64,
    ram_mib: u64,
    cmdline: String,
}

const USAGE: &str = "usage: linux_boot VMLINUX [--seconds N] [--ram-mib M] [--cmdline \"...\"]";

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut kernel = None;
    let (mut seconds, mut ram_mib, mut cmdline) = (300, 256, DEFAULT_CMDLINE.to_string());
    while let Some(a) = args.next() {
        let mut value = |what: &str| args.next().ok_or(format!("{what} needs a value"));
        match a.as_str() {
            "--seconds" => seconds = value("--seconds")?.parse().map_err(|e| format!("{e}"))?,
            "--ram-mib" => ram_mib = value("--ram-mib")?.parse().map_err(|e| format!("{e}"))?,
            "--cmdline" => cmdline = value("--cmdline")?,
            "-h" | "--help" => return Err(String::new()),
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            _ if kernel.is_some() => return Err("more than one VMLINUX".into()),
            _ => kernel = Some(PathBuf::from(a)),
        }
    }
    Ok(Args {
        kernel: kernel.ok_or("VMLINUX is required")?,
        seconds,
        ram_mib,
        cmdline,
    })
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("linux_boot: {e}\n{USAGE}");
            return ExitCode::from(0x80);
        }
    };
    match run(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("linux_boot: {e}");
            ExitCode::from(255)
        }
    }
}

fn report(console: &Mutex<Console>, stats: &EmulationStats, exits: Option<&ExitStats>, why: &str) {
    let c = console.lock().unwrap_or_else(|e| e.into_inner());
    println!("\n--- linux_boot: {why}; {} console lines", c.lines);
    for (name, at) in &c.reached {
        println!("milestone {:>8.1} s  {name}", at.as_secs_f64());
    }
    println!("emulated instructions: {:?}", stats.emulated);
    println!(
        "exceptions raised by emulated instructions: {:?}",
        stats.exceptions
    );
    if let Some(e) = exits {
        println!("{e}");
    }
}

fn run(args: Args) -> Result<u8, Box<dyn std::error::Error>> {
    let start = Instant::now();
    // 1. Memory and page tables (the 64-bit protocol wants paging on, identity for the kernel).
    // The legacy hole below 1 MiB is reserved, as a PC BIOS reports it (Linux also ignores
    // an e820 map of a single entry and falls back to e801).
    let layout = GuestLayout::builder()
        .ram_size(args.ram_mib << 20)
        .reserved("legacy", 0x9_f000, 0x10_0000 - 0x9_f000)
        .build()?;
    let mem = layout.create_memory()?;
    let mut tables = PageTableBuilder::new(&mem, PAGE_TABLES, 0x7000)?;
    tables.identity_map(0, 4 << 30, PageSize::Size2M, flags::WRITABLE)?;

    // 2. The kernel, the command line and the zero page.
    let mut file = std::fs::File::open(&args.kernel)?;
    let loaded = vmkit_memory::boot::load_elf(&mem, &mut file)?;
    if args.cmdline.len() + 1 > CMDLINE_MAX {
        return Err("command line too long".into());
    }
    mem.write_slice(args.cmdline.as_bytes(), GuestAddress(CMDLINE))?;
    mem.write_obj(0u8, GuestAddress(CMDLINE + args.cmdline.len() as u64))?;
    let mut params = boot_params::default();
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = args.cmdline.len() as u32;
    params.hdr.kernel_alignment = 0x0100_0000;
    let e820 = layout.e820();
    for (slot, e) in params.e820_table.iter_mut().zip(e820.iter()) {
        *slot = (*e).into();
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE)),
        &mem,
    )?;

    // 3. The VM: in-kernel irqchip and PIT, one vCPU at the entry with RSI = zero page.
    let mut vm = KvmVm::new()?;
    vm.create_irqchip()?;
    vm.fd()
        .create_pit2(kvm_bindings::kvm_pit_config::default())
        .map_err(|e| format!("KVM_CREATE_PIT2: {e}"))?;
    vm.register_memory(&mem)?;
    let mut vcpu = vm.create_vcpu(0)?;
    let cpu = LongModeState::linux_64(tables.cr3(), loaded.entry, STACK_TOP, ZERO_PAGE);
    cpu.write_gdt(&mem)?;
    cpu.apply(&mut vcpu)?;
    println!(
        "vmm: {} at {:#x}, {} MiB, cmdline \"{}\"",
        args.kernel.display(),
        loaded.entry,
        args.ram_mib,
        args.cmdline
    );

    // 4. COM1 to stdout through the milestone scanner; unclaimed ports read as all ones.
    let console = Arc::new(Mutex::new(Console::default()));
    let buses = IoBuses::default();
    let writer = ConsoleWriter {
        start,
        state: console.clone(),
    };
    buses.pio.insert(
        COM1 as u64,
        8,
        "com1",
        Arc::new(Serial::new(Arc::new(NoInterrupt), writer)),
    )?;

    // 5. A watchdog reports and ends the process when the time is up (the vCPU may be inside
    //    a long KVM_RUN); the run loop emulates what KVM gives up on.
    let stats = Arc::new(Mutex::new(EmulationStats::default()));
    let done = Arc::new(AtomicBool::new(false));
    {
        let (console, stats, done) = (console.clone(), stats.clone(), done.clone());
        let seconds = args.seconds;
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(seconds));
            if !done.swap(true, Ordering::AcqRel) {
                let s = stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
                report(&console, &s, None, &format!("time is up after {seconds} s"));
                let _ = std::io::stdout().flush();
                std::process::exit(0);
            }
        });
    }
    let mut emu = Emulator::new();
    let mut exits = ExitStats::default();
    let stop = StopHandle::new();
    let (code, why) = loop {
        match run_until_exit(&mut vcpu, &buses, &stop, &mut exits)? {
            RunOutcome::Exit(e @ Exit::InternalError { .. }) => {
                let bytes = e.instruction_bytes().unwrap_or_default();
                let r = emulate_exit(&mut vcpu, &mem, &mut emu, &e);
                if let Ok(Outcome::Exception(x)) = &r
                    && x.kind == EventKind::Fault
                {
                    println!(
                        "vmm: an emulated instruction {bytes:02x?} raised vector {}",
                        x.vector
                    );
                }
                *stats.lock().unwrap_or_else(|e| e.into_inner()) = emu.stats().clone();
                if let Err(err) = r {
                    let cause = std::error::Error::source(&err)
                        .map(|s| s.to_string())
                        .unwrap_or_default();
                    break (1, format!("emulation stopped: {err}: {cause}"));
                }
            }
            RunOutcome::Exit(Exit::Shutdown) => break (0, "the guest shut down (reset)".into()),
            RunOutcome::Exit(Exit::SystemEvent { kind, .. }) => {
                break (0, format!("system event {kind}"));
            }
            RunOutcome::Exit(Exit::Hlt) => break (0, "the guest halted".into()),
            RunOutcome::Exit(other) => break (1, format!("unexpected exit {other:?}")),
            RunOutcome::Stopped(s) => break (0, format!("stopped ({s})")),
        }
    };
    if !done.swap(true, Ordering::AcqRel) {
        report(&console, emu.stats(), Some(&exits), &why);
    }
    Ok(code)
}
