//! The commented TOML printer behind `Config::to_toml_string` (`flotilla config default`).
//!
//! It walks the schema table (not the serde output) so that sections and keys come out in the
//! documented order, each preceded by its one-line doc. Unset optional keys, and whole unset
//! optional tables such as `[model.rope_scaling]` or the `[sentinel]` section, are printed
//! commented out with an example value, so the printed default doubles as a reference of every
//! key. Whatever it prints must
//! parse back to the same config (tested), and `configs/default.toml` is its output verbatim.

use std::fmt::Write as _;

use super::schema::{Field, SECTIONS, Ty};

/// The header of the printed config.
const PREAMBLE: &str = "\
# Flotilla config. Every key is optional: a missing key takes the value shown here,
# and an empty file is this config. Unknown keys are errors. A key shown commented out is
# unset, with an example value; \"not supported yet\" keys are refused when set.
# Print it with `flotilla config default`.
";

/// Prints `values` (a serialized config) in schema order with docs as comments. Optional keys
/// absent from `values` are printed commented out, with their value from `hints`.
pub(crate) fn emit(values: &toml::Table, hints: &toml::Table) -> String {
    let mut out = String::from(PREAMBLE);
    for section in SECTIONS {
        let vals = values.get(section.name).and_then(toml::Value::as_table);
        let hint = hints.get(section.name).and_then(toml::Value::as_table);
        // An optional section that is unset (`[sentinel]`) is printed commented out.
        let commented = vals.is_none();
        let prefix = if commented { "# " } else { "" };
        let _ = write!(out, "\n# {}\n{prefix}[{}]\n", section.doc, section.name);
        emit_table(
            &mut out,
            section.name,
            section.fields,
            vals,
            hint,
            commented,
        );
    }
    out
}

/// Prints one table's keys: scalars first, then sub-tables under their own headers.
fn emit_table(
    out: &mut String,
    path: &str,
    fields: &[Field],
    values: Option<&toml::Table>,
    hints: Option<&toml::Table>,
    commented: bool,
) {
    let prefix = if commented { "# " } else { "" };
    for field in fields.iter().filter(|f| !matches!(f.ty, Ty::Table(_))) {
        let value = values.and_then(|v| v.get(field.name));
        let (shown, prefix) = match value {
            Some(v) => (v, prefix),
            // An unset `Option`, or any key of an unset optional table: show the example
            // value, commented out.
            None if field.optional || commented => match hints.and_then(|h| h.get(field.name)) {
                Some(hint) => (hint, "# "),
                None => continue,
            },
            // Non-optional fields always serialize; nothing to show otherwise.
            None => continue,
        };
        let _ = writeln!(
            out,
            "# {}\n{prefix}{} = {}",
            field.doc,
            field.name,
            show(shown)
        );
    }
    for field in fields {
        let Ty::Table(sub) = field.ty else { continue };
        let sub_path = format!("{path}.{}", field.name);
        let value = values
            .and_then(|v| v.get(field.name))
            .and_then(toml::Value::as_table);
        let hint = hints
            .and_then(|h| h.get(field.name))
            .and_then(toml::Value::as_table);
        let sub_commented = commented || value.is_none();
        let prefix = if sub_commented { "# " } else { "" };
        let _ = write!(out, "\n# {}\n{prefix}[{sub_path}]\n", field.doc);
        emit_table(out, &sub_path, sub, value, hint, sub_commented);
    }
}

/// A value as TOML, with very small or large floats in exponent form (`1e-8`, not
/// `0.00000001`); both read back to the same `f64`.
fn show(value: &toml::Value) -> String {
    match value {
        toml::Value::Float(x) if x.is_finite() && *x != 0.0 && !(1e-3..1e7).contains(&x.abs()) => {
            format!("{x:e}")
        }
        other => other.to_string(),
    }
}
