//! The whole forward pass gives the same bits on the scalar kernels as on every SIMD kernel
//! table this CPU runs (each chosen with `GEMMA3_KERNELS`, which also sets the attention
//! ops, the activation quantizers and the element-wise ops to its level): every matmul of the model (the packed layout's `spec_dot`
//! arithmetic), the attention ops, the activation quantizers and GeGLU are defined as fixed
//! sequences of exact integer sums and single-rounded float operations, which every table
//! repeats. The kernel table is chosen once per process, so this test runs itself as a child
//! process once under `GEMMA3_FORCE_SCALAR=1` and once per table, and compares the logits
//! of a prefill and of decode steps bit for bit.

mod common;

use gemma3_model::{Batch, ForwardState, KvCache};
use std::path::PathBuf;
use std::process::Command;

const CHILD: &str = "GEMMA3_TWIN_OUT";
const TEST: &str = "scalar_and_simd_forward_passes_give_the_same_bits";

/// Logits of a 35-token prompt (every position) and of 3 greedy decode steps, as bits,
/// preceded by the name of the kernel table that computed them.
fn child(out: PathBuf) {
    let (model, tok) = common::model(TEST).expect("the parent checked the model is present");
    // Over 32 tokens: where the CPU has AMX, two whole 16-token tiles and a
    // remainder on the other kernels.
    let prompt = tok.encode(
        "The capital of France is Paris, and the capital of Italy is Rome. Spain's capital \
         is Madrid, Portugal's is Lisbon, and the capital of Germany is",
        true,
        false,
    );
    assert!(prompt.len() > 32, "{} prompt tokens", prompt.len());
    let mut cache = KvCache::new(&model.config, 64);
    let mut st = ForwardState::new();
    let mut bits: Vec<u32> = Vec::new();
    let logits = model
        .forward(
            &Batch::for_sequence(&prompt, 0, true),
            std::slice::from_mut(&mut cache),
            &mut st,
        )
        .expect("prefill");
    bits.extend(logits.iter().map(|v| v.to_bits()));
    let vocab = model.config.vocab_size;
    let mut next = common::argmax(&logits[logits.len() - vocab..]);
    for i in 0..3 {
        let b = Batch::for_sequence(&[next], prompt.len() + i, true);
        let logits = model
            .forward(&b, std::slice::from_mut(&mut cache), &mut st)
            .expect("decode");
        bits.extend(logits.iter().map(|v| v.to_bits()));
        next = common::argmax(logits);
    }
    let mut bytes = gemma3_kernels::simd::best().name.as_bytes().to_vec();
    bytes.push(b'\n');
    bytes.extend(bits.iter().flat_map(|b| b.to_le_bytes()));
    std::fs::write(&out, bytes).expect("writing the child's logits");
}

/// The child's output with the scalar kernels (`table` None) or the named table.
fn run_child(table: Option<&str>, out: &PathBuf) -> Vec<u8> {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD, out);
    match table {
        None => cmd
            .env("GEMMA3_FORCE_SCALAR", "1")
            .env_remove("GEMMA3_KERNELS"),
        Some(t) => cmd
            .env_remove("GEMMA3_FORCE_SCALAR")
            .env("GEMMA3_KERNELS", t),
    };
    let o = cmd.output().expect("running the test binary as a child");
    assert!(
        o.status.success(),
        "child ({table:?}) failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::read(out).expect("the child's logits")
}

/// The table name a child wrote and its logits' bytes.
fn split(v: &[u8]) -> (String, Vec<u8>) {
    let nl = v.iter().position(|&c| c == b'\n').unwrap();
    (
        String::from_utf8(v[..nl].to_vec()).unwrap(),
        v[nl + 1..].to_vec(),
    )
}

#[test]
fn scalar_and_simd_forward_passes_give_the_same_bits() {
    if let Some(out) = std::env::var_os(CHILD) {
        return child(PathBuf::from(out));
    }
    if common::model_path(TEST).is_none() {
        return;
    }
    let (sname, sbits) = split(&run_child(None, &common::temp_path("twin-scalar.bin")));
    assert_eq!(sname, "scalar");
    // NaNs would make the comparison meaningless (their bits depend on how
    // they arose): a model that gives any, such as a badly cut stand-in, is
    // refused here rather than compared.
    if let Some(i) = (0..sbits.len() / 4)
        .find(|&i| !f32::from_le_bytes(sbits[4 * i..4 * i + 4].try_into().unwrap()).is_finite())
    {
        panic!("the scalar kernels' logit {i} is not finite: this model cannot be compared");
    }
    let tables: Vec<&str> = gemma3_kernels::simd::available()
        .iter()
        .map(|k| k.name)
        .filter(|&n| n != "scalar")
        .collect();
    for table in tables {
        let (vname, vbits) = split(&run_child(
            Some(table),
            &common::temp_path(&format!("twin-{table}.bin")),
        ));
        assert_eq!(vname, table, "GEMMA3_KERNELS chose the table");
        eprintln!(
            "compared the scalar kernels with '{vname}' over {} logits",
            sbits.len() / 4
        );
        assert_eq!(sbits.len(), vbits.len());
        if let Some(i) =
            (0..sbits.len() / 4).find(|&i| sbits[4 * i..4 * i + 4] != vbits[4 * i..4 * i + 4])
        {
            let f = |v: &[u8]| f32::from_le_bytes(v[4 * i..4 * i + 4].try_into().unwrap());
            panic!(
                "logit {i} differs: scalar {} vs {vname} {}",
                f(&sbits),
                f(&vbits)
            );
        }
    }
}
