//! `${...}` interpolation in step fields.
//!
//! A string that is exactly one `${x}` takes the value's own type (so
//! `spacing: ${params.spacing}` stays a list); `${x}` inside a longer string
//! is replaced by its text. Names: `params.<path>`, `matrix.<key>`,
//! `variant` (the foreach/matrix variant name) and `name` (the step instance).

use serde_json::Value;

/// Variables visible to one step instance.
pub struct Vars<'a> {
    /// The pipeline's params.
    pub params: &'a Value,
    /// The matrix values of this instance (empty object when none).
    pub matrix: &'a Value,
    /// Variant name, if the step was expanded.
    pub variant: Option<&'a str>,
    /// Instance name.
    pub name: &'a str,
}

impl Vars<'_> {
    fn get(&self, expr: &str) -> Result<Value, String> {
        let expr = expr.trim();
        let (root, rest) = match expr.split_once('.') {
            Some((r, p)) => (r, Some(p)),
            None => (expr, None),
        };
        let base = match root {
            "params" => self.params,
            "matrix" => self.matrix,
            "variant" if rest.is_none() => {
                return self
                    .variant
                    .map(|v| Value::String(v.to_string()))
                    .ok_or_else(|| {
                        "`${variant}` is only defined in steps with `foreach` or `matrix`".into()
                    })
            }
            "name" if rest.is_none() => return Ok(Value::String(self.name.to_string())),
            _ => {
                return Err(format!(
                    "unknown variable `{expr}` (known: params.*, matrix.*, variant, name)"
                ))
            }
        };
        let mut v = base;
        if let Some(path) = rest {
            for part in path.split('.') {
                v = match v {
                    Value::Object(m) => m.get(part),
                    Value::Array(a) => part.parse::<usize>().ok().and_then(|i| a.get(i)),
                    _ => None,
                }
                .ok_or_else(|| {
                    let known = match base {
                        Value::Object(m) => m.keys().cloned().collect::<Vec<_>>().join(", "),
                        _ => String::new(),
                    };
                    let hint = super::error::did_you_mean(part, known.split(", "))
                        .map(|h| format!("; {h}"))
                        .unwrap_or_default();
                    format!("`${{{expr}}}`: no `{part}` in `{root}` (it has: {known}){hint}")
                })?;
            }
        }
        Ok(v.clone())
    }
}

/// Interpolates every string inside `value`; on error returns the dotted
/// path (relative to `value`) and the message.
pub fn interpolate(value: &Value, vars: &Vars) -> Result<Value, (String, String)> {
    walk(value, vars, "")
}

fn walk(value: &Value, vars: &Vars, path: &str) -> Result<Value, (String, String)> {
    Ok(match value {
        Value::String(s) => string(s, vars).map_err(|e| (path.to_string(), e))?,
        Value::Array(a) => Value::Array(
            a.iter()
                .enumerate()
                .map(|(i, v)| walk(v, vars, &super::yaml::join(path, &i.to_string())))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(m) => {
            let mut out = serde_json::Map::new();
            for (k, v) in m {
                out.insert(k.clone(), walk(v, vars, &super::yaml::join(path, k))?);
            }
            Value::Object(out)
        }
        other => other.clone(),
    })
}

fn string(s: &str, vars: &Vars) -> Result<Value, String> {
    if !s.contains("${") {
        return Ok(Value::String(s.to_string()));
    }
    // A lone `${x}` keeps the value's type.
    if s.starts_with("${") && s.ends_with('}') && s[2..].find('}') == Some(s.len() - 3) {
        return vars.get(&s[2..s.len() - 1]);
    }
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed `${{` in `{s}`"))?;
        match vars.get(&after[..end])? {
            Value::String(t) => out.push_str(&t),
            other => out.push_str(&other.to_string()),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(Value::String(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lone_reference_keeps_type_and_embedded_becomes_text() {
        let params = json!({"spacing": [1.5, 1.5, 2.0], "lr": 0.0001, "m": {"fs": 12}});
        let matrix = json!({"seed": 3});
        let vars = Vars {
            params: &params,
            matrix: &matrix,
            variant: Some("weak"),
            name: "t@weak",
        };
        let v = json!({"a": "${params.spacing}", "b": "lr=${params.lr} fs=${params.m.fs}",
                       "c": "${matrix.seed}", "d": "out-${variant}"});
        let r = interpolate(&v, &vars).unwrap();
        assert_eq!(
            r,
            json!({"a": [1.5, 1.5, 2.0], "b": "lr=0.0001 fs=12", "c": 3, "d": "out-weak"})
        );
        let err = interpolate(&json!({"x": {"y": "${params.lrr}"}}), &vars).unwrap_err();
        assert_eq!(err.0, "x.y");
        assert!(err.1.contains("did you mean `lr`"), "{}", err.1);
    }
}
