//! The optimized binary calls no SIMD intrinsic out of line. Each kernel is compiled once
//! per instruction set inside a `#[target_feature]` function, and its intrinsics (`_mm256_…`,
//! `_mm512_…`) become instructions only where they are inlined into it. A closure that a
//! kernel calls from two places may be compiled as a function of its own, without the
//! features, and every intrinsic in it as a call: it happened twice in this project, each
//! time making a kernel 10–80× slower with the same results (prompts ran at 7 tokens/s
//! instead of 600 at `7767d57`). Speed is not asserted in tests; this is the cause, which
//! the symbol table shows exactly: an out-of-line intrinsic is a function symbol.

/// Names of the function symbols in the ELF64 (little-endian) file `bytes`.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn function_symbols(bytes: &[u8]) -> Vec<String> {
    let u16_at = |o: usize| u16::from_le_bytes(bytes[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap()) as usize;
    assert_eq!(&bytes[..5], b"\x7fELF\x02", "an ELF64 file");
    let (shoff, shentsize, shnum) = (u64_at(0x28), u16_at(0x3a), u16_at(0x3c));
    let section = |i: usize| shoff + i * shentsize;
    let mut names = Vec::new();
    for i in 0..shnum {
        let sh = section(i);
        const SHT_SYMTAB: usize = 2;
        if u32_at(sh + 4) != SHT_SYMTAB {
            continue;
        }
        let (off, size, entsize) = (u64_at(sh + 24), u64_at(sh + 32), u64_at(sh + 56));
        let strtab = u64_at(section(u32_at(sh + 40)) + 24);
        for s in (off..off + size).step_by(entsize) {
            const STT_FUNC: u8 = 2;
            if bytes[s + 4] & 0xf != STT_FUNC {
                continue;
            }
            let name = &bytes[strtab + u32_at(s)..];
            let end = name.iter().position(|&b| b == 0).unwrap();
            names.push(String::from_utf8_lossy(&name[..end]).into_owned());
        }
    }
    names
}

#[test]
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn no_simd_intrinsic_is_called_out_of_line() {
    if cfg!(debug_assertions) {
        eprintln!("skipped: an unoptimized build inlines nothing (run with --release)");
        return;
    }
    let bin = env!("CARGO_BIN_EXE_gemma3");
    let bytes = std::fs::read(bin).expect("reading the gemma3 binary");
    let symbols = function_symbols(&bytes);
    // The binary keeps its symbol table (and the kernels are in it).
    assert!(
        symbols.iter().any(|s| s.contains("avx2_t1")),
        "no kernel symbol found among {} function symbols: stripped?",
        symbols.len()
    );
    // Intrinsics live in `core::core_arch::x86`; their names start with `_mm`.
    let out_of_line: Vec<&String> = symbols
        .iter()
        .filter(|s| s.contains("core_arch") && s.contains("_mm"))
        .collect();
    assert!(
        out_of_line.is_empty(),
        "{} SIMD intrinsics compiled as functions (a kernel lost its target features): {:?}",
        out_of_line.len(),
        &out_of_line[..out_of_line.len().min(5)]
    );
}
