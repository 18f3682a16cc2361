//! The text side of a model: `tokenizer.json` through the `tokenizers` crate, and the chat template
//! (from `chat_template.jinja` or `tokenizer_config.json`) rendered with minijinja as transformers'
//! `apply_chat_template` renders it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage { role: role.to_string(), content: content.to_string() }
    }
}

/// A tokenizer with its special tokens and chat template.
pub struct TextTokenizer {
    tokenizer: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl TextTokenizer {
    /// Builds from `tokenizer.json` bytes, and optionally `tokenizer_config.json` and a
    /// `chat_template.jinja` (which wins over the config's template, as in transformers).
    pub fn from_files(tokenizer_json: &[u8], tokenizer_config_json: Option<&[u8]>, chat_template_jinja: Option<&[u8]>) -> Result<Self> {
        // the tokenizers crate panics on some syntax errors (inside the decoder) instead of
        // returning them: check the JSON first
        serde_json::from_slice::<Value>(tokenizer_json).map_err(|e| Error::file("tokenizer.json", format!("not valid JSON: {e}")))?;
        let tokenizer = tokenizers::Tokenizer::from_bytes(tokenizer_json)
            .map_err(|e| Error::file("tokenizer.json", format!("cannot load tokenizer: {e}")))?;
        let config: Value = match tokenizer_config_json {
            Some(bytes) => {
                serde_json::from_slice(bytes).map_err(|e| Error::file("tokenizer_config.json", format!("not valid JSON: {e}")))?
            }
            None => Value::Null,
        };
        let chat_template = match chat_template_jinja {
            Some(bytes) => Some(String::from_utf8(bytes.to_vec()).map_err(|_| Error::file("chat_template.jinja", "not UTF-8 text"))?),
            None => template_from_config(&config),
        };
        Ok(TextTokenizer {
            tokenizer,
            chat_template,
            bos_token: special_token(&config, "bos_token"),
            eos_token: special_token(&config, "eos_token"),
        })
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (BOS etc.).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode(text, add_special_tokens).map_err(|e| Error::invalid(format!("cannot tokenize: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped or not.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer.decode(ids, skip_special_tokens).map_err(|e| Error::invalid(format!("cannot decode token ids: {e}")))
    }

    /// The id of a token string (e.g. "<|im_end|>").
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The end-of-turn token named by tokenizer_config.json (e.g. `<|im_end|>`).
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Its id.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token().and_then(|t| self.token_id(t))
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// The chat template (chat_template.jinja's, else tokenizer_config.json's default).
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Renders the conversation with the chat template, as transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let source = self.chat_template.as_deref().ok_or_else(|| {
            Error::invalid("this model has no chat template (no chat_template.jinja and none in tokenizer_config.json); use a plain prompt")
        })?;
        let mut env = minijinja::Environment::new();
        // a template comes from an arbitrary model file: bound its work, its nesting and its output
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_recursion_limit(TEMPLATE_RECURSION);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        });
        env.add_template("chat", source).map_err(|e| Error::file("chat template", format!("cannot parse: {e}")))?;
        let template = env.get_template("chat").expect("just added");
        let context = minijinja::context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        let mut out = BoundedText { text: Vec::new(), limit: TEMPLATE_OUTPUT + messages.iter().map(|m| m.content.len()).sum::<usize>() };
        let rendered = template.render_captured_to(context, &mut out).map(|_| ());
        match rendered {
            Ok(_) => String::from_utf8(out.text).map_err(|_| Error::file("chat template", "rendered text that is not UTF-8")),
            Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => Err(Error::file(
                "chat template",
                format!(
                    "stopped after {TEMPLATE_FUEL} steps: a chat template renders a conversation in far fewer; the model's template loops without end or is hostile"
                ),
            )),
            Err(_) if out.text.len() > out.limit => Err(Error::file(
                "chat template",
                format!(
                    "rendered more than {} bytes for a conversation of {} messages; the model's template is broken or hostile",
                    out.limit,
                    messages.len()
                ),
            )),
            Err(e) => Err(Error::file("chat template", format!("cannot render: {e}"))),
        }
    }

    /// Token ids of a rendered conversation (the template already holds the special tokens).
    pub fn encode_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<Vec<u32>> {
        self.encode(&self.apply_chat_template(messages, add_generation_prompt)?, false)
    }

    /// A decoder that turns ids arriving one by one into text pieces, holding back incomplete
    /// UTF-8 sequences until their last byte arrives.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder { tokenizer: self, ids: Vec::new(), emitted: 0 }
    }
}

/// See [`TextTokenizer::stream_decoder`].
pub struct StreamDecoder<'a> {
    tokenizer: &'a TextTokenizer,
    ids: Vec<u32>,
    emitted: usize,
}

impl StreamDecoder<'_> {
    /// Adds one id; returns the new text, if any is complete.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, true)?;
        if text.ends_with('\u{FFFD}') || text.len() <= self.emitted || !text.is_char_boundary(self.emitted) {
            return Ok(None);
        }
        let piece = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(Some(piece))
    }
}

/// Template steps a rendering may take: real chat templates take a few thousand per message.
const TEMPLATE_FUEL: u64 = 5_000_000;
/// Nesting of macros and calls a rendering may reach.
const TEMPLATE_RECURSION: usize = 100;
/// Bytes a rendering may write beyond the messages' own text.
const TEMPLATE_OUTPUT: usize = 1 << 20;

/// A writer that refuses to grow past `limit` bytes.
struct BoundedText {
    text: Vec<u8>,
    limit: usize,
}

impl std::io::Write for BoundedText {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + bytes.len() > self.limit {
            self.text.extend_from_slice(bytes);
            return Err(std::io::Error::other("the rendered text is too long"));
        }
        self.text.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `chat_template` in tokenizer_config.json: a string, or a list of {name, template} (use "default").
fn template_from_config(config: &Value) -> Option<String> {
    match config.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

/// A special token in tokenizer_config.json: a string or an AddedToken object {content, ...}.
pub(crate) fn special_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}
