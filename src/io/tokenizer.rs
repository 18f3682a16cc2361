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

    /// The id of the end-of-turn token named by tokenizer_config.json (e.g. `<|im_end|>`).
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_id(t))
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders the conversation with the chat template, as transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let source = self.chat_template.as_deref().ok_or_else(|| {
            Error::invalid("this model has no chat template (no chat_template.jinja and none in tokenizer_config.json); use a plain prompt")
        })?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        });
        env.add_template("chat", source).map_err(|e| Error::file("chat template", format!("cannot parse: {e}")))?;
        let template = env.get_template("chat").expect("just added");
        template
            .render(minijinja::context! {
                messages => minijinja::Value::from(minijinja::value::Serde(messages)),
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.clone().unwrap_or_default(),
                eos_token => self.eos_token.clone().unwrap_or_default(),
            })
            .map_err(|e| Error::file("chat template", format!("cannot render: {e}")))
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
fn special_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}
