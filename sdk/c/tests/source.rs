//! Two rules of this FFI crate that the compiler cannot check, checked on its source: every
//! unsafe block, function and impl is in `src/ptr.rs` (the module of pointer conversions), and
//! every exported function runs its body inside `guard` or `quiet`, which catch panics, so that
//! none crosses into C.

const LIB: &str = include_str!("../src/lib.rs");
const PTR: &str = include_str!("../src/ptr.rs");

#[test]
fn unsafe_code_is_in_the_pointer_module_only() {
    // Built from pieces, so that this file does not hold what it looks for.
    let forms = [
        concat!("unsafe", " {"),
        concat!("unsafe", " impl"),
        concat!("unsafe", " fn"),
        concat!("unsafe", " extern"),
    ];
    for form in forms {
        assert!(
            !LIB.contains(form),
            "src/lib.rs holds `{form}`: move it to src/ptr.rs"
        );
    }
    // Each unsafe block or impl in ptr.rs says why it is sound.
    let lines: Vec<&str> = PTR.lines().collect();
    for (n, line) in lines.iter().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        if code.contains(forms[0]) || code.contains(forms[1]) {
            let above = lines[..n]
                .iter()
                .rev()
                .take_while(|l| l.trim_start().starts_with("//"))
                .any(|l| l.contains("SAFETY:"));
            assert!(above, "src/ptr.rs line {}: no SAFETY comment", n + 1);
        }
    }
}

#[test]
fn every_exported_function_catches_panics() {
    let marker = concat!("pub extern ", "\"C\" fn ");
    let mut count = 0;
    for item in LIB.split(marker).skip(1) {
        count += 1;
        let name = item.split('(').next().unwrap_or("?");
        // The body starts after the signature's `{` at the end of a line.
        let body = item
            .split_once("{\n")
            .map(|(_, body)| body.trim_start())
            .unwrap_or("");
        assert!(
            body.starts_with("guard(") || body.starts_with("quiet("),
            "{name} does not run its body in guard() or quiet()"
        );
    }
    assert!(count >= 20, "found {count} exported functions");
}
