//! Tokenizer (`tokenizer.json` through the tokenizers crate) and prompt formatting: the chat template of
//! `tokenizer_config.json` rendered the way transformers renders it (Jinja with `trim_blocks`,
//! `lstrip_blocks`, `raise_exception`, Python string methods), or an explicit format for models without one.

use crate::error::{CageError, Result};
use minijinja::{Environment, ErrorKind, Value as JValue, context};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// One chat message.
#[derive(Debug, Clone)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Text.
    pub content: String,
}

/// How a prompt becomes model input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptFormat {
    /// The text as given, with the tokenizer's own special tokens (BOS where the model adds one).
    Plain,
    /// The model's chat template with a generation prompt.
    Chat,
    /// Alpaca: `### Instruction:\n{prompt}\n\n### Response:\n`.
    Alpaca,
}

/// Instructions a chat template may execute per rendering: real templates need a few thousand per message; a
/// hostile or broken one (nested loops) stops with an error after about a second instead of running for hours.
pub const TEMPLATE_FUEL: u64 = 20_000_000;

/// A tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    template: Option<String>,
    bos: Option<String>,
    eos: Option<String>,
}

/// Runs a call into the tokenizers crate with its panics turned into errors: it panics on some malformed
/// `tokenizer.json` files (an `expect` in its decoder deserializer) where it should return an error, and a
/// model folder is untrusted input.
fn no_panic<R>(what: &str, f: impl FnOnce() -> std::result::Result<R, tokenizers::Error>) -> Result<R> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(|e| CageError::Tokenizer(format!("{what}: {e}"))),
        Err(p) => {
            let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
            Err(CageError::Tokenizer(format!("{what}: the tokenizers library failed: {}", msg.unwrap_or_default())))
        }
    }
}

fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and, if present, `dir/tokenizer_config.json` (or `chat_template.jinja`).
    pub fn load(dir: &Path) -> Result<Self> {
        let tp = dir.join("tokenizer.json");
        let inner = no_panic(&format!("loading {}", tp.display()), || tokenizers::Tokenizer::from_file(&tp))?;
        let cp = dir.join("tokenizer_config.json");
        let (mut template, mut bos, mut eos) = (None, None, None);
        if cp.is_file() {
            let text = std::fs::read_to_string(&cp)
                .map_err(|source| CageError::Io { context: format!("reading {}", cp.display()), source })?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| CageError::Format { what: cp.display().to_string(), msg: e.to_string() })?;
            template = match v.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: transformers picks "default".
                Some(Value::Array(a)) => a
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                _ => None,
            };
            bos = token_str(v.get("bos_token"));
            eos = token_str(v.get("eos_token"));
        }
        let jp = dir.join("chat_template.jinja");
        if template.is_none() && jp.is_file() {
            template = Some(
                std::fs::read_to_string(&jp)
                    .map_err(|source| CageError::Io { context: format!("reading {}", jp.display()), source })?,
            );
        }
        Ok(Tokenizer { inner, template, bos, eos })
    }

    /// Whether the model ships a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Token ids of `text`; `special` adds the tokenizer's BOS/EOS the way `tokenizer(text)` does.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let e = no_panic("encoding", || self.inner.encode(text, special))?;
        Ok(e.get_ids().to_vec())
    }

    /// Text of `ids`; `skip_special` drops special tokens.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        no_panic("decoding", || self.inner.decode(ids, skip_special))
    }

    /// Id of a token string.
    pub fn token_to_id(&self, tok: &str) -> Option<u32> {
        self.inner.token_to_id(tok)
    }

    /// The end-of-sequence token's id, if the config names one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Renders `messages` with the chat template, as `apply_chat_template(..., tokenize=False)` does.
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let t = self.template.as_deref().ok_or_else(|| {
            CageError::Tokenizer("this model has no chat template; use the plain or alpaca prompt format".into())
        })?;
        let mut env = Environment::new();
        // The template comes with the model files: a loop over range(100000) inside another must fail, not hang.
        env.set_fuel(Some(TEMPLATE_FUEL));
        let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build();
        env.set_syntax(syntax.map_err(|e| CageError::Tokenizer(e.to_string()))?);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<JValue, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String {
            // Templates use it for "today's date" in system prompts; a fixed date keeps output reproducible.
            fmt.replace("%d", "01")
                .replace("%B", "January")
                .replace("%b", "Jan")
                .replace("%Y", "2025")
                .replace("%m", "01")
        });
        env.add_template("chat", t).map_err(|e| CageError::Tokenizer(format!("chat template does not parse: {e}")))?;
        let tmpl = env.get_template("chat").map_err(|e| CageError::Tokenizer(e.to_string()))?;
        let msgs: Vec<JValue> = messages
            .iter()
            .map(|m| {
                let map: BTreeMap<&str, JValue> =
                    [("role", JValue::from(m.role.as_str())), ("content", JValue::from(m.content.as_str()))]
                        .into_iter()
                        .collect();
                JValue::from(map)
            })
            .collect();
        tmpl.render(context! {
            messages => msgs,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.clone().unwrap_or_default(),
            eos_token => self.eos.clone().unwrap_or_default(),
        })
        .map_err(|e| CageError::Tokenizer(format!("rendering the chat template: {e}")))
    }

    /// Token ids for a single user prompt in the given format (chat: rendered, then tokenized without adding
    /// special tokens, as transformers' `apply_chat_template(tokenize=True)` does).
    pub fn prompt_ids(&self, prompt: &str, format: PromptFormat) -> Result<Vec<u32>> {
        match format {
            PromptFormat::Plain => self.encode(prompt, true),
            PromptFormat::Alpaca => self.encode(&format!("### Instruction:\n{prompt}\n\n### Response:\n"), true),
            PromptFormat::Chat => {
                let text = self.render_chat(&[Message { role: "user".into(), content: prompt.into() }], true)?;
                self.encode(&text, false)
            }
        }
    }
}
