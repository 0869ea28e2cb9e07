//! One spelling per enumerated value. Every enum of the configuration and the command line (solver method,
//! decoding method, backend, normalisation, token choice, prompt format, stop reason) derives clap's
//! [`ValueEnum`]: its variant names, clap's `rename_all` and `alias` attributes are the only place its spelling
//! is written. [`spelled!`](crate::spelled) derives everything else from them: `Display` (outputs),
//! `FromStr`, serde's `Serialize` and `Deserialize` (configs, JSON lines). On the command line a flag of such a
//! type takes `value_parser = NameParser::<T>::new()` (clap's derive would otherwise pick its own enum parser, whose
//! message does not say what kind of value was wrong): its error is [`parse`]'s, naming the bad value and the
//! accepted ones, and `--help` lists the values.

use crate::error::{CageError, Result};
use clap::ValueEnum;
use clap::builder::{PossibleValue, TypedValueParser};
use std::marker::PhantomData;

/// An enum spelled by its clap value names; implemented by [`spelled!`](crate::spelled).
pub trait Named: ValueEnum + Clone + Send + Sync + 'static {
    /// What a value is, in messages: `method`, `backend`, ...
    const WHAT: &'static str;
}

/// Writes the value name of `v`: its spelling in configs, on the command line and in outputs (padded as the
/// format asks, so `{:>10}` aligns it).
pub fn write_name<T: ValueEnum>(v: &T, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    match v.to_possible_value() {
        Some(p) => f.pad(p.get_name()),
        None => Err(std::fmt::Error),
    }
}

/// The accepted names of `T`, comma-separated, in declaration order (aliases left out).
pub fn accepted<T: ValueEnum>() -> String {
    let names: Vec<String> =
        T::value_variants().iter().filter_map(|v| v.to_possible_value()).map(|p| p.get_name().to_string()).collect();
    names.join(", ")
}

/// Parses a value name or alias (surrounding whitespace ignored); the error names the bad value and the accepted
/// ones.
pub fn parse<T: Named>(s: &str) -> Result<T> {
    T::from_str(s.trim(), false).map_err(|_| CageError::InvalidArgument(unknown::<T>(s)))
}

/// The message for a bad value `s` of `T`: the value and the accepted names. Configs wrap it in the field's path
/// (`cpu_weights: unknown cpu_weights "f16" (expected one of stored, f32)`), so it carries no error kind.
pub fn unknown<T: Named>(s: &str) -> String {
    format!("unknown {} {s:?} (expected one of {})", T::WHAT, accepted::<T>())
}

/// The clap value parser of a [`Named`] enum: [`parse`]'s message on a bad value, the value names in `--help`
/// and completions.
pub struct NameParser<T>(PhantomData<fn() -> T>);

impl<T> NameParser<T> {
    /// The parser.
    pub fn new() -> Self {
        NameParser(PhantomData)
    }
}

impl<T> Default for NameParser<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for NameParser<T> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<T: Named> TypedValueParser for NameParser<T> {
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> std::result::Result<T, clap::Error> {
        let s = value.to_string_lossy();
        T::from_str(s.trim(), false)
            .map_err(|_| cmd.clone().error(clap::error::ErrorKind::InvalidValue, unknown::<T>(&s)))
    }

    /// The value names, without the variants' doc comments: the flag's own help says what they mean there.
    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        let values = T::value_variants().iter().filter_map(ValueEnum::to_possible_value);
        Some(Box::new(values.map(|p| p.help(None::<&'static str>))))
    }
}

/// Derives, for an enum that derives [`clap::ValueEnum`], [`Named`] with the noun its messages use, `Display`,
/// `FromStr`, serde's `Serialize` and `Deserialize`: all spelled by the clap value names.
#[macro_export]
macro_rules! spelled {
    ($t:ty, $what:literal) => {
        impl $crate::names::Named for $t {
            const WHAT: &'static str = $what;
        }
        impl ::std::fmt::Display for $t {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                $crate::names::write_name(self, f)
            }
        }
        impl ::std::str::FromStr for $t {
            type Err = $crate::error::CageError;
            fn from_str(s: &str) -> $crate::error::Result<Self> {
                $crate::names::parse(s)
            }
        }
        impl ::serde::Serialize for $t {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> ::std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> ::serde::Deserialize<'de> for $t {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> ::std::result::Result<Self, D::Error> {
                let s = <::std::borrow::Cow<'de, str> as ::serde::Deserialize>::deserialize(d)?;
                <$t as ::clap::ValueEnum>::from_str(s.trim(), false)
                    .map_err(|_| ::serde::de::Error::custom($crate::names::unknown::<$t>(&s)))
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;
    use crate::decode::sweep::ScoreScale;
    use crate::decode::{DecodeMethod, FormatSetting, StopReason, TokenizerMismatch};
    use crate::problem::Normalize;
    use crate::sampling::Choice;
    use crate::solver::Method;
    use std::fmt::Debug;

    /// Every variant survives Display -> FromStr and serde; a bad value is refused by name.
    fn round_trips<
        T: Named + PartialEq + Debug + std::fmt::Display + serde::Serialize + serde::de::DeserializeOwned,
    >(
        names: &[&str],
    ) {
        let got: Vec<String> = T::value_variants().iter().map(|v| v.to_string()).collect();
        assert_eq!(got, names, "{}", T::WHAT);
        for v in T::value_variants() {
            assert_eq!(&parse::<T>(&v.to_string()).unwrap(), v);
            let json = serde_json::to_string(v).unwrap();
            assert_eq!(json, format!("\"{v}\""));
            assert_eq!(&serde_json::from_str::<T>(&json).unwrap(), v);
        }
        let e = parse::<T>("nonsense").unwrap_err().to_string();
        assert!(e.contains(&format!("unknown {} \"nonsense\"", T::WHAT)) && e.contains(names[0]), "{e}");
        // A config's error is the field's path, then this message: no second error kind inside it.
        let e = serde_json::from_str::<T>("\"nonsense\"").unwrap_err().to_string();
        assert!(e.starts_with(&format!("unknown {} \"nonsense\"", T::WHAT)) && e.contains(&accepted::<T>()), "{e}");
    }

    #[test]
    fn every_enum_is_spelled_once() {
        round_trips::<Method>(&["exact", "jacobi", "paper", "base", "linear"]);
        round_trips::<DecodeMethod>(&["base", "linear", "genarm", "mod", "cage", "cage-paper", "parm"]);
        round_trips::<Backend>(&["cpu", "cuda", "emulation", "auto"]);
        round_trips::<Normalize>(&["shift_min", "none"]);
        round_trips::<Choice>(&["greedy", "gumbel", "race"]);
        round_trips::<FormatSetting>(&["auto", "chat", "plain", "alpaca"]);
        round_trips::<StopReason>(&["eos", "stop", "length", "context"]);
        round_trips::<TokenizerMismatch>(&["error", "allow", "retokenize"]);
        round_trips::<ScoreScale>(&["none", "minmax"]);
    }

    #[test]
    fn aliases_and_whitespace() {
        // The run configs' `sampling: sample` is the Gumbel-max draw.
        assert_eq!(parse::<Choice>("sample").unwrap(), Choice::Gumbel);
        assert_eq!(serde_json::from_str::<Choice>("\"sample\"").unwrap(), Choice::Gumbel);
        assert_eq!(parse::<DecodeMethod>(" genarm ").unwrap(), DecodeMethod::Genarm);
    }

    #[test]
    fn the_clap_parser_names_the_bad_value() {
        #[derive(clap::Parser, Debug)]
        struct Args {
            #[arg(long, value_delimiter = ',', value_parser = NameParser::<DecodeMethod>::new())]
            methods: Vec<DecodeMethod>,
            #[arg(long, default_value_t = Backend::Cpu, value_parser = NameParser::<Backend>::new())]
            backend: Backend,
        }
        let a = <Args as clap::Parser>::try_parse_from(["x", "--methods", "cage,genarm"]).unwrap();
        assert_eq!(a.methods, [DecodeMethod::Cage, DecodeMethod::Genarm]);
        assert_eq!(a.backend, Backend::Cpu);
        let e = <Args as clap::Parser>::try_parse_from(["x", "--backend", "tpu"]).unwrap_err().to_string();
        assert!(e.contains("unknown backend \"tpu\" (expected one of cpu, cuda, emulation, auto)"), "{e}");
    }
}
