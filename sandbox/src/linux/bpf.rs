//! A binary-search dispatch in front of seccompiler's program.
//!
//! seccompiler lays a filter out as one linear chain, a comparison per
//! allowed syscall. Installing it costs the kernel time in proportion to
//! the chain's length times every syscall number: `seccomp_cache_prepare`
//! emulates the program once per syscall number of each architecture to
//! find the ones it always allows. Measured here: 95-115 us to install the
//! helper's 140-instruction filter, against 15-30 us for a one-instruction
//! one and 660 us for a 300-comparison chain; it is a tenth of a helper's
//! launch.
//!
//! This module puts a balanced tree of `jge` comparisons on the syscall
//! number in front: a syscall allowed outright is answered `ALLOW` at its
//! leaf (about six comparisons, which the kernel's cache then remembers),
//! one the policy does not name gets the mismatch action at its leaf, and
//! only the syscalls with argument rules go on into the program seccompiler
//! compiled from exactly those rules. The result is the same decision as
//! seccompiler's full program for every architecture, syscall number and
//! argument (the tests check it with an interpreter over both programs),
//! in a program whose cost no longer grows with the policy's size.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch, sock_filter};

use super::seccomp::PolicyError;

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JA: u16 = 0x05;
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
const BPF_RET_K: u16 = 0x06;
/// `offsetof(struct seccomp_data, nr)` and `arch`.
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// Where a leaf of the tree sends a syscall number it matched.
#[derive(Clone, Copy)]
enum Leaf {
    Allow,
    Rules,
}

/// Compiles `rules` (a syscall number to its argument rules; none means
/// allowed outright) with the dispatch tree in front of seccompiler's
/// program of the argument rules alone.
pub(crate) fn compile(
    rules: &BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    arch: TargetArch,
    audit_arch: u32,
) -> Result<BpfProgram, PolicyError> {
    let mismatch_ret = u32::from(mismatch.clone());
    let mut leaves: Vec<(u32, Leaf)> = Vec::with_capacity(rules.len());
    let mut argued: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (nr, chain) in rules {
        let number = u32::try_from(*nr).map_err(|_| PolicyError::UnknownSyscall(nr.to_string()))?;
        if chain.is_empty() {
            leaves.push((number, Leaf::Allow));
        } else {
            leaves.push((number, Leaf::Rules));
            argued.insert(*nr, chain.clone());
        }
    }
    // Same as seccompiler's own first steps: a foreign architecture is
    // killed whatever the mode (its syscall numbers mean other calls).
    let mut program = vec![
        stmt(BPF_LD_W_ABS, ARCH_OFFSET),
        jump(BPF_JMP_JEQ_K, audit_arch, 1, 0),
        stmt(BPF_RET_K, u32::from(SeccompAction::KillProcess)),
        stmt(BPF_LD_W_ABS, NR_OFFSET),
    ];
    // Jumps to the rules' program, patched once its start is known.
    let mut to_rules = Vec::new();
    tree(&leaves, mismatch_ret, &mut program, &mut to_rules)?;
    if !argued.is_empty() {
        let start = program.len();
        for at in to_rules {
            program[at].k = u32::try_from(start - at - 1).map_err(|_| PolicyError::TooLarge)?;
        }
        let rest: BpfProgram =
            SeccompFilter::new(argued, mismatch, SeccompAction::Allow, arch)?.try_into()?;
        program.extend(rest);
    }
    if program.len() > 4096 {
        return Err(PolicyError::TooLarge);
    }
    Ok(program)
}

/// Emits the subtree for `leaves` (sorted by number): a `jge` on the middle
/// number splits it; at most three numbers are compared one by one, then
/// the mismatch action. `jt`/`jf` reach 255 instructions at most: a
/// subtree larger than that is refused (the helper's has a few dozen).
fn tree(
    leaves: &[(u32, Leaf)],
    mismatch_ret: u32,
    out: &mut Vec<sock_filter>,
    to_rules: &mut Vec<usize>,
) -> Result<(), PolicyError> {
    if leaves.len() <= 3 {
        for (number, leaf) in leaves {
            // Equal: the next instruction decides; else skip it.
            out.push(jump(BPF_JMP_JEQ_K, *number, 0, 1));
            match leaf {
                Leaf::Allow => out.push(stmt(BPF_RET_K, u32::from(SeccompAction::Allow))),
                Leaf::Rules => {
                    to_rules.push(out.len());
                    out.push(stmt(BPF_JMP_JA, 0));
                }
            }
        }
        out.push(stmt(BPF_RET_K, mismatch_ret));
        return Ok(());
    }
    let mid = leaves.len() / 2;
    let split = out.len();
    // Number >= middle: the right half, after the left half's code.
    out.push(jump(BPF_JMP_JGE_K, leaves[mid].0, 0, 0));
    tree(&leaves[..mid], mismatch_ret, out, to_rules)?;
    out[split].jt = u8::try_from(out.len() - split - 1).map_err(|_| PolicyError::TooLarge)?;
    tree(&leaves[mid..], mismatch_ret, out, to_rules)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SeccompPolicy;

    /// The seccomp data a filter sees: nr, arch, ip, args.
    struct Data {
        nr: u32,
        arch: u32,
        args: [u64; 6],
    }

    impl Data {
        fn word(&self, offset: u32) -> u32 {
            match offset {
                0 => self.nr,
                4 => self.arch,
                8 | 12 => 0,
                16..=63 if offset.is_multiple_of(4) => {
                    let arg = self.args[((offset - 16) / 8) as usize];
                    if (offset - 16).is_multiple_of(8) {
                        arg as u32
                    } else {
                        (arg >> 32) as u32
                    }
                }
                _ => panic!("load at {offset}"),
            }
        }
    }

    /// Runs a classic BPF program of the instructions seccompiler and this
    /// module emit, and panics on anything else (so a new instruction
    /// cannot slip past the comparison).
    fn run(program: &[sock_filter], data: &Data) -> u32 {
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let insn = &program[pc];
            let (jt, jf) = (insn.jt as usize, insn.jf as usize);
            pc += 1;
            match insn.code {
                BPF_LD_W_ABS => acc = data.word(insn.k),
                BPF_RET_K => return insn.k,
                BPF_JMP_JA => pc += insn.k as usize,
                BPF_JMP_JEQ_K => pc += if acc == insn.k { jt } else { jf },
                BPF_JMP_JGE_K => pc += if acc >= insn.k { jt } else { jf },
                0x25 => pc += if acc > insn.k { jt } else { jf },
                0x45 => pc += if acc & insn.k != 0 { jt } else { jf },
                0x54 => acc &= insn.k,
                other => panic!("instruction {other:#x} not interpreted"),
            }
        }
    }

    fn programs(policy: &SeccompPolicy, mismatch: SeccompAction) -> (BpfProgram, BpfProgram) {
        let arch = TargetArch::try_from(std::env::consts::ARCH).expect("arch");
        let full: BpfProgram = SeccompFilter::new(
            policy.rules().clone(),
            mismatch.clone(),
            SeccompAction::Allow,
            arch,
        )
        .expect("filter")
        .try_into()
        .expect("compiles");
        let fast = compile(
            policy.rules(),
            mismatch,
            arch,
            super::super::seccomp::audit_arch(),
        )
        .expect("compiles");
        (full, fast)
    }

    fn values() -> Vec<u64> {
        let mut values = vec![
            0,
            1,
            2,
            3,
            4,
            5,
            7,
            8,
            14,
            15,
            16,
            17,
            100,
            101,
            0x20,
            0x2000,
            0x4_0000,
            0x8000_0000,
            0xFFFF_FFFF,
            1 << 32,
            (1 << 32) | 1,
            (1 << 32) | 2,
            u64::MAX,
            u64::from(std::process::id()),
        ];
        values.push(libc::PROT_EXEC as u64);
        values.push((libc::PROT_EXEC | libc::PROT_READ) as u64);
        values.push(libc::MAP_LOCKED as u64);
        values.push((libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64);
        values
    }

    #[test]
    fn the_dispatch_decides_exactly_as_seccompilers_program() {
        let mut policy = SeccompPolicy::helper_default().expect("policy");
        policy.allow_name("uname").expect("extra");
        let audit = super::super::seccomp::audit_arch();
        let values = values();
        for mismatch in [SeccompAction::KillProcess, SeccompAction::Log] {
            let (full, fast) = programs(&policy, mismatch);
            let mut compared = 0u64;
            for arch in [audit, 0x4000_0003, 0] {
                for nr in (0..1024u32).chain([0x4000_0000, 0x4000_0001, 0x4000_0100, u32::MAX]) {
                    let argued = policy
                        .rules()
                        .get(&i64::from(nr))
                        .is_some_and(|rules| !rules.is_empty());
                    let sets: Vec<[u64; 6]> = if argued && arch == audit {
                        // Each argument position through every value.
                        (0..6)
                            .flat_map(|at| {
                                values.iter().map(move |v| {
                                    let mut args = [0u64; 6];
                                    args[at] = *v;
                                    args
                                })
                            })
                            .chain(values.iter().map(|v| [*v; 6]))
                            .collect()
                    } else {
                        vec![[0; 6], [u64::MAX; 6]]
                    };
                    for args in sets {
                        let data = Data { nr, arch, args };
                        assert_eq!(
                            run(&full, &data),
                            run(&fast, &data),
                            "nr {nr} arch {arch:#x} args {args:?}"
                        );
                        compared += 1;
                    }
                }
            }
            assert!(compared > 6000);
        }
    }

    #[test]
    fn the_dispatch_is_shorter_and_allows_plain_syscalls_at_a_leaf() {
        let policy = SeccompPolicy::helper_default().expect("policy");
        let (full, fast) = programs(&policy, SeccompAction::KillProcess);
        assert!(fast.len() < full.len(), "{} vs {}", fast.len(), full.len());
        // A plain allowed syscall is decided before any argument is loaded.
        let audit = super::super::seccomp::audit_arch();
        let nr = u32::try_from(libc::SYS_futex).expect("nr");
        let mut steps = 0;
        let mut pc = 0;
        loop {
            let insn = &fast[pc];
            steps += 1;
            assert!(
                !(insn.code == BPF_LD_W_ABS && insn.k >= 16),
                "loaded an argument"
            );
            let acc_nr = nr;
            pc += 1;
            match insn.code {
                BPF_RET_K => {
                    assert_eq!(insn.k, u32::from(SeccompAction::Allow));
                    break;
                }
                BPF_JMP_JEQ_K if pc > 2 => {
                    pc += if acc_nr == insn.k { insn.jt } else { insn.jf } as usize
                }
                BPF_JMP_JEQ_K => pc += if audit == insn.k { insn.jt } else { insn.jf } as usize,
                BPF_JMP_JGE_K => pc += if acc_nr >= insn.k { insn.jt } else { insn.jf } as usize,
                BPF_LD_W_ABS => {}
                other => panic!("{other:#x} before the leaf"),
            }
        }
        assert!(steps < 16, "{steps} instructions to allow futex");
    }
}
