//! `LoraConfig`: PEFT's `adapter_config.json`, with PEFT's rules for which modules an adapter
//! targets and with which rank, alpha and scaling (peft/tuners/lora/config.py and
//! tuners_utils.check_target_module_exists). Keys we do not use survive a load/save round trip;
//! settings we cannot honour are refused with the key and value named.

use regex::Regex;
use serde_json::{Map, Value, json};

use crate::error::{Error, Result};

/// How `target_modules` selects modules.
#[derive(Debug, Clone)]
pub enum TargetModules {
    /// Module names or name suffixes (PEFT: `key == t or key.endswith("." + t)`).
    Names(Vec<String>),
    /// A regex that must match the whole module name (PEFT: `re.fullmatch`).
    Regex(String, Regex),
    /// Every linear layer except the output head.
    AllLinear,
}

/// `init_lora_weights`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraInit {
    /// `true`: A kaiming-uniform (a = sqrt(5)), B zeros.
    Default,
    /// `false`: A and B both random (the adapter is not a no-op: for tests).
    Random,
    /// `"gaussian"`: A ~ N(0, 1/r), B zeros.
    Gaussian,
    /// `"olora"`: QR of the base weight; the base is shifted so the output is unchanged.
    Olora,
    /// `"pissa"`: SVD of the base weight; same contract.
    Pissa,
}

impl LoraInit {
    fn to_json(self) -> Value {
        match self {
            LoraInit::Default => json!(true),
            LoraInit::Random => json!(false),
            LoraInit::Gaussian => json!("gaussian"),
            LoraInit::Olora => json!("olora"),
            LoraInit::Pissa => json!("pissa"),
        }
    }
}

/// A LoRA adapter's configuration.
#[derive(Debug, Clone)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    pub exclude_modules: Option<TargetModules>,
    pub use_rslora: bool,
    pub init_lora_weights: LoraInit,
    /// (regex, rank) in file order; the first that matches a module wins.
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f64)>,
    pub layers_to_transform: Option<Vec<usize>>,
    pub layers_pattern: Option<Vec<String>>,
    pub base_model_name_or_path: Option<String>,
    /// The file as read (or as built), for writing back every key.
    raw: Map<String, Value>,
}

/// Keys whose only supported values are PEFT's defaults: (key, is the value acceptable).
const MUST_BE_DEFAULT: &[(&str, fn(&Value) -> bool)] = &[
    ("use_dora", |v| v.is_null() || v == &json!(false)),
    ("fan_in_fan_out", |v| v.is_null() || v == &json!(false)),
    ("modules_to_save", |v| v.is_null() || v.as_array().is_some_and(|a| a.is_empty())),
    ("target_parameters", |v| v.is_null() || v.as_array().is_some_and(|a| a.is_empty())),
    ("lora_bias", |v| v.is_null() || v == &json!(false)),
    ("use_qalora", |v| v.is_null() || v == &json!(false)),
    ("trainable_token_indices", Value::is_null),
    ("layer_replication", Value::is_null),
    ("megatron_config", Value::is_null),
    ("loftq_config", |v| v.is_null() || v.as_object().is_some_and(|o| o.is_empty())),
    ("eva_config", Value::is_null),
    ("corda_config", Value::is_null),
    ("arrow_config", Value::is_null),
    ("alora_invocation_tokens", Value::is_null),
];

/// rank_pattern / alpha_pattern keys match a name's tail at a dot (PEFT's get_pattern_key).
const SUFFIX_PATTERN: &str = "^(?:.*\\.)?(?:{})$";

fn compile(pattern: &str, anchored: &str, file: &str, key: &str) -> Result<Regex> {
    Regex::new(&anchored.replace("{}", pattern))
        .map_err(|e| Error::file(file, format!("{key}: {pattern:?} is not a regex we can use: {e}")))
}

fn parse_targets(v: &Value, file: &str, key: &str) -> Result<Option<TargetModules>> {
    Ok(match v {
        Value::Null => None,
        Value::String(s) if s.eq_ignore_ascii_case("all-linear") && key == "target_modules" => Some(TargetModules::AllLinear),
        Value::String(s) => Some(TargetModules::Regex(s.clone(), compile(s, "^(?:{})$", file, key)?)),
        Value::Array(items) => Some(TargetModules::Names(
            items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| Error::file(file, format!("{key} must list module names (strings), got {i}")))
                })
                .collect::<Result<_>>()?,
        )),
        other => return Err(Error::file(file, format!("{key} must be a list of names, a regex or \"all-linear\", got {other}"))),
    })
}

/// The keys of an adapter_config.json being parsed, with errors that name the file, key and value.
struct Keys<'a> {
    raw: &'a Map<String, Value>,
    file: &'a str,
}

impl Keys<'_> {
    fn get(&self, key: &str) -> &Value {
        self.raw.get(key).unwrap_or(&Value::Null)
    }

    fn bad<T>(&self, key: &str, why: &str) -> Result<T> {
        Err(Error::file(self.file, format!("{key} = {}: {why}", self.get(key))))
    }

    /// Refuses adapter kinds and settings we cannot honour (PEFT's defaults are fine).
    fn check_supported(&self) -> Result<()> {
        if self.get("peft_type").as_str() != Some("LORA") {
            return self.bad("peft_type", "only LORA adapters are supported");
        }
        if !matches!(self.get("task_type"), Value::Null) && self.get("task_type") != "CAUSAL_LM" {
            return self.bad("task_type", "only CAUSAL_LM is supported");
        }
        if !matches!(self.get("bias").as_str(), None | Some("none")) {
            return self.bad("bias", "only \"none\" is supported");
        }
        match MUST_BE_DEFAULT.iter().find(|(key, ok)| !ok(self.get(key))) {
            Some((key, _)) => self.bad(key, "this setting is not supported; remove it or use PEFT's default"),
            None => Ok(()),
        }
    }

    fn rank(&self) -> Result<usize> {
        match self.get("r").as_u64() {
            Some(r) if r > 0 => Ok(r as usize),
            _ => self.bad("r", "the rank must be a positive integer"),
        }
    }

    /// A number that `ok` accepts, or `default` when the key is absent.
    fn number(&self, key: &str, default: f64, ok: impl Fn(f64) -> bool, why: &str) -> Result<f64> {
        match self.get(key) {
            Value::Null => Ok(default),
            v => match v.as_f64() {
                Some(x) if ok(x) => Ok(x),
                _ => self.bad(key, why),
            },
        }
    }

    fn init(&self) -> Result<LoraInit> {
        Ok(match self.get("init_lora_weights") {
            Value::Null | Value::Bool(true) => LoraInit::Default,
            Value::Bool(false) => LoraInit::Random,
            Value::String(s) if s == "gaussian" => LoraInit::Gaussian,
            Value::String(s) if s == "olora" => LoraInit::Olora,
            Value::String(s) if s == "pissa" => LoraInit::Pissa,
            _ => {
                let supported =
                    "supported: true, false, \"gaussian\", \"olora\", \"pissa\" (for \"pissa_niter_N\" use the exact \"pissa\")";
                return self.bad("init_lora_weights", supported);
            }
        })
    }

    /// rank_pattern / alpha_pattern: {regex: number}, in file order.
    fn pattern(&self, key: &str) -> Result<Vec<(String, f64)>> {
        match self.get(key) {
            Value::Null => Ok(vec![]),
            Value::Object(map) => map
                .iter()
                .map(|(p, v)| {
                    compile(p, SUFFIX_PATTERN, self.file, key)?;
                    v.as_f64().map(|v| (p.clone(), v)).ok_or_else(|| Error::file(self.file, format!("{key}[{p:?}] must be a number")))
                })
                .collect(),
            _ => Err(Error::file(self.file, format!("{key} must map regexes to numbers"))),
        }
    }

    fn rank_pattern(&self) -> Result<Vec<(String, usize)>> {
        self.pattern("rank_pattern")?
            .into_iter()
            .map(|(p, v)| match v >= 1.0 && v.fract() == 0.0 {
                true => Ok((p, v as usize)),
                false => Err(Error::file(self.file, format!("rank_pattern[{p:?}] = {v}: ranks are positive integers"))),
            })
            .collect()
    }

    /// (layers_to_transform, layers_pattern).
    fn layers(&self) -> Result<(Option<Vec<usize>>, Option<Vec<String>>)> {
        let index =
            |v: &Value| v.as_u64().map(|i| i as usize).ok_or_else(|| Error::file(self.file, "layers_to_transform must be layer indices"));
        let layers_to_transform = match self.get("layers_to_transform") {
            Value::Null => None,
            v @ Value::Number(_) => Some(vec![index(v)?]),
            Value::Array(a) => Some(a.iter().map(index).collect::<Result<_>>()?),
            _ => return self.bad("layers_to_transform", "must be a layer index or a list of them"),
        };
        let layers_pattern = match self.get("layers_pattern") {
            Value::Null => None,
            Value::String(s) => Some(vec![s.clone()]),
            Value::Array(a) => Some(a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()),
            _ => return self.bad("layers_pattern", "must be a name or a list of names"),
        };
        if layers_pattern.is_some() && layers_to_transform.is_none() {
            return self.bad("layers_pattern", "only has a meaning together with layers_to_transform");
        }
        Ok((layers_to_transform, layers_pattern))
    }
}

impl TargetModules {
    /// The modules any of `all` targets, as PEFT combines them in add_weighted_adapter: name lists
    /// are united, regexes joined with `|`; "all-linear" covers every other choice.
    pub fn union(all: &[&TargetModules]) -> Result<TargetModules> {
        if all.iter().any(|t| matches!(t, TargetModules::AllLinear)) {
            return Ok(TargetModules::AllLinear);
        }
        if all.iter().all(|t| matches!(t, TargetModules::Names(_))) {
            let mut names: Vec<String> = Vec::new();
            for t in all {
                if let TargetModules::Names(list) = t {
                    for n in list {
                        if !names.contains(n) {
                            names.push(n.clone());
                        }
                    }
                }
            }
            return Ok(TargetModules::Names(names));
        }
        if all.iter().all(|t| matches!(t, TargetModules::Regex(..))) {
            let joined = all
                .iter()
                .map(|t| match t {
                    TargetModules::Regex(p, _) => format!("({p})"),
                    _ => unreachable!(),
                })
                .collect::<Vec<_>>()
                .join("|");
            let re = compile(&joined, "^(?:{})$", "combined adapters", "target_modules")?;
            return Ok(TargetModules::Regex(joined, re));
        }
        Err(Error::invalid("cannot combine adapters whose target_modules mix name lists and regexes (PEFT refuses this too)"))
    }

    fn matches(&self, module: &str, is_linear_layer: bool) -> bool {
        match self {
            TargetModules::Names(names) => names.iter().any(|t| module == t || module.ends_with(&format!(".{t}"))),
            TargetModules::Regex(_, re) => re.is_match(module),
            TargetModules::AllLinear => is_linear_layer,
        }
    }

    fn to_json(&self) -> Value {
        match self {
            TargetModules::Names(names) => json!(names),
            TargetModules::Regex(s, _) => json!(s),
            TargetModules::AllLinear => json!("all-linear"),
        }
    }
}

impl LoraConfig {
    /// The settings a training run chooses, as text (target module names sorted): what a run that
    /// continues this adapter may not set otherwise.
    pub fn training_settings(&self) -> [(&'static str, String); 6] {
        let targets = match &self.target_modules {
            TargetModules::Names(names) => {
                let mut names = names.clone();
                names.sort();
                names.join(",")
            }
            TargetModules::Regex(pattern, _) => pattern.clone(),
            TargetModules::AllLinear => "all-linear".into(),
        };
        [
            ("r", self.r.to_string()),
            ("lora_alpha", self.lora_alpha.to_string()),
            ("lora_dropout", self.lora_dropout.to_string()),
            ("target_modules", targets),
            ("init_lora_weights", self.init_lora_weights.to_json().to_string()),
            ("use_rslora", self.use_rslora.to_string()),
        ]
    }

    /// A config as `LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, task_type="CAUSAL_LM")`.
    pub fn new(r: usize, lora_alpha: f64, target_modules: TargetModules) -> Result<Self> {
        let raw = json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": lora_alpha,
            "lora_dropout": 0.0, "bias": "none", "target_modules": target_modules.to_json(),
            "use_rslora": false, "init_lora_weights": true, "rank_pattern": {}, "alpha_pattern": {},
            "fan_in_fan_out": false, "use_dora": false, "modules_to_save": null, "layers_to_transform": null,
            "layers_pattern": null, "base_model_name_or_path": null, "inference_mode": true,
        });
        Self::from_value(raw, "LoraConfig")
    }

    /// Parses adapter_config.json; `file` names it in errors.
    pub fn from_json(bytes: &[u8], file: &str) -> Result<Self> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| Error::file(file, format!("not valid JSON: {e}")))?;
        Self::from_value(value, file)
    }

    fn from_value(value: Value, file: &str) -> Result<Self> {
        let Value::Object(raw) = value else { return Err(Error::file(file, "expected a JSON object")) };
        let keys = Keys { raw: &raw, file };
        keys.check_supported()?;
        let r = keys.rank()?;
        let lora_alpha = keys.number("lora_alpha", 8.0, |a| a.is_finite(), "must be a number")?;
        let lora_dropout = keys.number("lora_dropout", 0.0, |p| (0.0..1.0).contains(&p), "must be a probability in [0, 1)")?;
        let target_modules = match parse_targets(keys.get("target_modules"), file, "target_modules")? {
            Some(t) => t,
            None => return keys.bad("target_modules", "name the modules to adapt (a list, a regex or \"all-linear\")"),
        };
        let exclude_modules = parse_targets(keys.get("exclude_modules"), file, "exclude_modules")?;
        let use_rslora = keys.get("use_rslora").as_bool().unwrap_or(false);
        let init_lora_weights = keys.init()?;
        let (rank_pattern, alpha_pattern) = (keys.rank_pattern()?, keys.pattern("alpha_pattern")?);
        let (layers_to_transform, layers_pattern) = keys.layers()?;
        let base_model_name_or_path = keys.get("base_model_name_or_path").as_str().map(str::to_string);
        Ok(LoraConfig {
            r,
            lora_alpha,
            lora_dropout,
            target_modules,
            exclude_modules,
            use_rslora,
            init_lora_weights,
            rank_pattern,
            alpha_pattern,
            layers_to_transform,
            layers_pattern,
            base_model_name_or_path,
            raw,
        })
    }

    /// The config as adapter_config.json text: every key read is kept, the typed ones as they are now.
    pub fn to_json(&self) -> String {
        let mut raw = self.raw.clone();
        raw.insert("r".into(), json!(self.r));
        raw.insert("lora_alpha".into(), json!(self.lora_alpha));
        raw.insert("lora_dropout".into(), json!(self.lora_dropout));
        raw.insert("target_modules".into(), self.target_modules.to_json());
        raw.insert("use_rslora".into(), json!(self.use_rslora));
        raw.insert("init_lora_weights".into(), self.init_lora_weights.to_json());
        raw.insert("rank_pattern".into(), Value::Object(self.rank_pattern.iter().map(|(p, r)| (p.clone(), json!(r))).collect()));
        raw.insert("alpha_pattern".into(), Value::Object(self.alpha_pattern.iter().map(|(p, a)| (p.clone(), json!(a))).collect()));
        raw.insert("base_model_name_or_path".into(), json!(self.base_model_name_or_path));
        serde_json::to_string_pretty(&Value::Object(raw)).expect("a JSON map serializes")
    }

    /// Whether the adapter applies to `module` (a dotted name such as
    /// `model.layers.3.self_attn.q_proj`); `is_linear_layer` is false for the output head.
    pub fn targets(&self, module: &str, is_linear_layer: bool) -> bool {
        if self.exclude_modules.as_ref().is_some_and(|ex| ex.matches(module, true)) {
            return false;
        }
        if !self.target_modules.matches(module, is_linear_layer) {
            return false;
        }
        // PEFT applies layers_to_transform to name lists only
        match (&self.target_modules, &self.layers_to_transform) {
            (TargetModules::Names(_), Some(layers)) if !layers.is_empty() => self.layer_index(module).is_some_and(|i| layers.contains(&i)),
            _ => true,
        }
    }

    /// The first layer index in the name, after a `layers_pattern` segment when one is given.
    fn layer_index(&self, module: &str) -> Option<usize> {
        let parts: Vec<&str> = module.split('.').collect();
        // as PEFT's regexes: without a pattern the index needs two segments before it
        // ("model.layers.3."), with one it must follow that name; a segment must follow the index
        let first = if self.layers_pattern.as_ref().is_some_and(|p| !p.is_empty()) { 1 } else { 2 };
        (first..parts.len().saturating_sub(1)).find_map(|i| {
            let after_pattern = match &self.layers_pattern {
                None => true,
                Some(p) if p.is_empty() => true,
                Some(p) => p.iter().any(|name| name == parts[i - 1]),
            };
            if after_pattern { parts[i].parse().ok() } else { None }
        })
    }

    fn pattern_value<T: Copy>(patterns: &[(String, T)], module: &str) -> Option<T> {
        patterns.iter().find_map(|(p, v)| {
            let re = compile(p, SUFFIX_PATTERN, "", "").expect("checked when parsed");
            re.is_match(module).then_some(*v)
        })
    }

    /// The rank of `module`: the first matching rank_pattern, else r.
    pub fn rank_for(&self, module: &str) -> usize {
        Self::pattern_value(&self.rank_pattern, module).unwrap_or(self.r)
    }

    /// lora_alpha of `module`: the first matching alpha_pattern, else lora_alpha.
    pub fn alpha_for(&self, module: &str) -> f64 {
        Self::pattern_value(&self.alpha_pattern, module).unwrap_or(self.lora_alpha)
    }

    /// The scale of B A for `module`: alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub fn scaling_for(&self, module: &str) -> f64 {
        let (r, alpha) = (self.rank_for(module) as f64, self.alpha_for(module));
        if self.use_rslora { alpha / r.sqrt() } else { alpha / r }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<LoraConfig> {
        LoraConfig::from_json(json.as_bytes(), "adapter_config.json")
    }

    const Q: &str = "model.layers.3.self_attn.q_proj";
    const V: &str = "model.layers.3.self_attn.v_proj";
    const UP: &str = "model.layers.10.mlp.up_proj";

    #[test]
    fn name_lists_match_names_and_suffixes_as_peft() {
        let c = parse(r#"{"peft_type":"LORA","r":8,"target_modules":["q_proj","self_attn.v_proj"]}"#).unwrap();
        assert!(c.targets(Q, true) && c.targets(V, true) && !c.targets(UP, true));
        // a suffix must start at a dot: "_proj" is not "q_proj"
        let c = parse(r#"{"peft_type":"LORA","r":8,"target_modules":["proj"]}"#).unwrap();
        assert!(!c.targets(Q, true));
        assert_eq!(c.lora_alpha, 8.0, "PEFT's default alpha");
    }

    #[test]
    fn regex_must_match_the_whole_name_and_all_linear_skips_the_head() {
        let c = parse(r#"{"peft_type":"LORA","r":4,"target_modules":".*\\.(q|v)_proj"}"#).unwrap();
        assert!(c.targets(Q, true) && c.targets(V, true) && !c.targets(UP, true));
        let c = parse(r#"{"peft_type":"LORA","r":4,"target_modules":"q_proj"}"#).unwrap();
        assert!(!c.targets(Q, true), "fullmatch, not search");
        let c = parse(r#"{"peft_type":"LORA","r":4,"target_modules":"all-linear"}"#).unwrap();
        assert!(c.targets(UP, true) && !c.targets("lm_head", false));
    }

    #[test]
    fn layers_to_transform_and_exclusions() {
        let c = parse(r#"{"peft_type":"LORA","r":4,"target_modules":["q_proj"],"layers_to_transform":[3,5]}"#).unwrap();
        assert!(c.targets(Q, true) && !c.targets("model.layers.4.self_attn.q_proj", true));
        let c =
            parse(r#"{"peft_type":"LORA","r":4,"target_modules":["q_proj"],"layers_to_transform":3,"layers_pattern":"layers"}"#).unwrap();
        assert!(c.targets(Q, true));
        let c = parse(r#"{"peft_type":"LORA","r":4,"target_modules":"all-linear","exclude_modules":["up_proj"]}"#).unwrap();
        assert!(c.targets(Q, true) && !c.targets(UP, true));
    }

    #[test]
    fn rank_alpha_and_scaling_follow_the_patterns() {
        let c = parse(
            r#"{"peft_type":"LORA","r":8,"lora_alpha":16,"target_modules":"all-linear",
            "rank_pattern":{"q_proj":4,"layers\\.10\\..*":2},"alpha_pattern":{"v_proj":32}}"#,
        )
        .unwrap();
        assert_eq!((c.rank_for(Q), c.rank_for(V), c.rank_for(UP)), (4, 8, 2));
        assert_eq!(c.scaling_for(Q), 16.0 / 4.0);
        assert_eq!(c.scaling_for(V), 32.0 / 8.0);
        let c = parse(r#"{"peft_type":"LORA","r":16,"lora_alpha":8,"use_rslora":true,"target_modules":["q_proj"]}"#).unwrap();
        assert_eq!(c.scaling_for(Q), 8.0 / 4.0);
    }

    #[test]
    fn unknown_keys_survive_a_round_trip() {
        let text = r#"{"peft_type":"LORA","task_type":"CAUSAL_LM","r":8,"lora_alpha":16,"target_modules":["q_proj","v_proj"],
            "revision":null,"auto_mapping":{"x":1},"peft_version":"0.21.2","init_lora_weights":"olora"}"#;
        let c = parse(text).unwrap();
        assert_eq!(c.init_lora_weights, LoraInit::Olora);
        let again: Value = serde_json::from_str(&c.to_json()).unwrap();
        let original: Value = serde_json::from_str(text).unwrap();
        for (k, v) in original.as_object().unwrap() {
            let same = again[k] == *v || (k == "lora_alpha" && again[k].as_f64() == v.as_f64());
            assert!(same, "{k}: {} != {v}", again[k]);
        }
    }

    #[test]
    fn unsupported_settings_name_key_and_value() {
        let cases = [
            (r#""use_dora":true"#, "use_dora = true"),
            (r#""modules_to_save":["lm_head"]"#, "modules_to_save = [\"lm_head\"]"),
            (r#""bias":"all""#, "bias = \"all\""),
            (r#""fan_in_fan_out":true"#, "fan_in_fan_out = true"),
            (r#""init_lora_weights":"loftq""#, "init_lora_weights = \"loftq\""),
            (r#""init_lora_weights":"pissa_niter_16""#, "init_lora_weights = \"pissa_niter_16\""),
            (r#""r":0"#, "r = 0"),
        ];
        for (extra, expected) in cases {
            let err = parse(&format!(r#"{{"peft_type":"LORA","r":8,"target_modules":["q_proj"],{extra}}}"#)).unwrap_err().to_string();
            assert!(err.starts_with(&format!("adapter_config.json: {expected}")), "{err}");
        }
        // PEFT's fast randomized-SVD PiSSA is refused in favour of the exact "pissa", saying so
        let err =
            parse(r#"{"peft_type":"LORA","r":8,"target_modules":["q_proj"],"init_lora_weights":"pissa_niter_4"}"#).unwrap_err().to_string();
        assert!(err.contains("for \"pissa_niter_N\" use the exact \"pissa\""), "{err}");
        let err = parse(r#"{"peft_type":"IA3","target_modules":["q_proj"]}"#).unwrap_err().to_string();
        assert!(err.contains("peft_type = \"IA3\""), "{err}");
        let err = parse(r#"{"peft_type":"LORA","r":8,"target_modules":"(unclosed"}"#).unwrap_err().to_string();
        assert!(err.contains("target_modules") && err.contains("(unclosed"), "{err}");
    }
}
