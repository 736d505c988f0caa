use super::*;

fn e(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        eax,
        ebx,
        ecx,
        edx,
        ..Default::default()
    }
}

fn host() -> CpuId {
    let mut leaf7 = e(7, 0, 0, 0xffff_ffff, 0xffff_ffff, 0);
    leaf7.flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
    CpuId::from_entries(&[
        e(0, 0, 0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
        e(1, 0, 0x906ea, 0x0001_0800, 0x7ffa_fbff, 0xbfeb_fbff),
        e(4, 0, 0x1c00_4121, 0, 0, 0),
        leaf7,
        e(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
        e(0x8000_0001, 0, 0, 0, 0x121, 0x2c10_0800),
    ])
    .unwrap()
}

fn get(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
    *c.as_slice()
        .iter()
        .find(|e| e.function == f && e.index == i)
        .unwrap()
}

#[test]
fn host_template_normalizes_topology_and_signature() {
    let c = CpuidTemplate::named("host")
        .unwrap()
        .build(
            &host(),
            Topology {
                vcpu_id: 5,
                nr_vcpus: 6,
            },
        )
        .unwrap();
    let l1 = get(&c, 1, 0);
    assert_eq!(l1.ebx >> 24, 5);
    assert_eq!((l1.ebx >> 16) & 0xff, 6);
    assert_ne!(l1.ecx & (1 << 31), 0);
    assert_ne!(l1.edx & (1 << 28), 0);
    assert_eq!(get(&c, 4, 0).eax >> 26, 5);
    // 0xB was absent but max basic leaf (0xd) ≥ 0xB: synthesized.
    let smt = get(&c, 0xb, 0);
    let core = get(&c, 0xb, 1);
    assert_eq!((smt.ebx, smt.ecx, smt.edx), (1, 0x100, 5));
    assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
    assert_eq!(get(&c, 0xb, 2).ecx, 2);
    let h = get(&c, HYPERVISOR_LEAF, 0);
    let mut sig = Vec::new();
    for r in [h.ebx, h.ecx, h.edx] {
        sig.extend_from_slice(&r.to_le_bytes());
    }
    assert_eq!(sig, KVM_SIGNATURE.as_bytes());
}

#[test]
fn minimal_hides_its_list_and_user_hides_apply() {
    let c = CpuidTemplate::named("minimal")
        .unwrap()
        .build(
            &host(),
            Topology {
                vcpu_id: 0,
                nr_vcpus: 1,
            },
        )
        .unwrap();
    for name in features::MINIMAL_HIDDEN {
        let f = features::feature(name).unwrap();
        if f.leaf == 0xd {
            continue; // not in this host table
        }
        let mut entry = get(&c, f.leaf, f.subleaf);
        assert_eq!(*reg(&mut entry, f.register) & (1 << f.bit), 0, "{name}");
    }
    assert_ne!(get(&c, 1, 0).ecx & (1 << 23), 0, "popcnt kept");
    assert_eq!(get(&c, 1, 0).edx & (1 << 28), 0, "HTT off for 1 vCPU");
}

#[test]
fn json_templates_round_trip_and_apply_overrides() {
    let t = CpuidTemplate::from_json(
        r#"{"name":"t","hide":["avx2"],"remove_leaves":[2147483649],
            "overrides":[{"leaf":0,"eax":7}],"hypervisor_signature":"VmkitVmkitVm"}"#,
    )
    .unwrap();
    assert_eq!(t.base, CpuidBase::Host);
    let json = serde_json::to_string(&t).unwrap();
    assert_eq!(CpuidTemplate::from_json(&json).unwrap(), t);
    let c = t
        .build(
            &host(),
            Topology {
                vcpu_id: 0,
                nr_vcpus: 2,
            },
        )
        .unwrap();
    assert_eq!(get(&c, 7, 0).ebx & (1 << 5), 0);
    assert_eq!(get(&c, 0, 0).eax, 7);
    assert!(c.as_slice().iter().all(|e| e.function != 0x8000_0001));
    assert_eq!(get(&c, HYPERVISOR_LEAF, 0).ebx.to_le_bytes(), *b"Vmki");
}

#[test]
fn bad_templates_are_typed_errors() {
    let topo = Topology {
        vcpu_id: 0,
        nr_vcpus: 1,
    };
    let mut t = CpuidTemplate::named("host").unwrap();
    t.hide = vec!["warp-drive".into()];
    assert!(
        matches!(t.build(&host(), topo), Err(CpuidError::UnknownFeature(n)) if n == "warp-drive")
    );
    t.hide = vec!["xsaves".into()]; // leaf 0xd.1 is not in the host table
    assert!(matches!(
        t.build(&host(), topo),
        Err(CpuidError::LeafMissing {
            leaf: 0xd,
            subleaf: 1,
            ..
        })
    ));
    t.hide.clear();
    t.remove_leaves = vec![0x14];
    assert!(matches!(
        t.build(&host(), topo),
        Err(CpuidError::NoSuchLeaf(0x14))
    ));
    t.remove_leaves.clear();
    t.overrides = vec![CpuidOverride {
        leaf: 0x8000_0008,
        ..Default::default()
    }];
    assert!(matches!(
        t.build(&host(), topo),
        Err(CpuidError::NoSuchLeaf(0x8000_0008))
    ));
    t.overrides.clear();
    t.hypervisor_signature = "short".into();
    assert!(matches!(
        t.build(&host(), topo),
        Err(CpuidError::Signature(5))
    ));
    assert!(matches!(
        CpuidTemplate::named("turbo"),
        Err(CpuidError::UnknownTemplate(_))
    ));
    assert!(matches!(
        CpuidTemplate::from_json(r#"{"name": 3}"#),
        Err(CpuidError::Json(_))
    ));
}
