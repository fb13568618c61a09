//! Typed option values shared by the library's option structs and the command line: value
//! parsers that check a number's range where it is read (the message states the range), and
//! [`clap_defaults`], which builds an option struct from its `clap` attributes alone, so that every
//! default is stated once, where `--help` shows it.

/// The value of a `clap::Args` struct when no flag is given: its declared defaults.
pub fn clap_defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let command = T::augment_args(clap::Command::new("defaults").no_binary_name(true));
    let matches = command.try_get_matches_from(std::iter::empty::<String>()).expect("every option has a default");
    T::from_arg_matches(&matches).expect("defaults parse")
}

/// An option struct from the flags `args`, every other option taking the default its `clap`
/// attribute declares: code that builds options states no default of its own. Panics when the
/// flags do not parse, which is a bug in the caller, not bad input.
pub fn clap_parse<T: clap::Args + clap::FromArgMatches>(args: Vec<std::ffi::OsString>) -> T {
    let command = T::augment_args(clap::Command::new("options").no_binary_name(true));
    let matches = command.try_get_matches_from(args).unwrap_or_else(|e| panic!("options built in code: {e}"));
    T::from_arg_matches(&matches).expect("parsed options")
}

/// The name `clap` knows a `ValueEnum` value by.
pub fn value_name<T: clap::ValueEnum>(value: &T) -> String {
    value.to_possible_value().expect("not skipped").get_name().to_string()
}

fn number(text: &str) -> Result<f64, String> {
    text.trim().parse::<f64>().map_err(|_| format!("`{text}` is not a number"))
}

/// A finite number ≥ 0 (damping, λ).
pub fn non_negative(text: &str) -> Result<f64, String> {
    let v = number(text)?;
    if v.is_finite() && v >= 0.0 { Ok(v) } else { Err(format!("must be a finite number ≥ 0, got {text}")) }
}

/// A finite number > 0 (tolerances, learning rates).
pub fn positive(text: &str) -> Result<f64, String> {
    let v = number(text)?;
    if v.is_finite() && v > 0.0 { Ok(v) } else { Err(format!("must be a finite number > 0, got {text}")) }
}

/// A share in (0, 1) (LDS subset fractions).
pub fn open_unit(text: &str) -> Result<f64, String> {
    let v = number(text)?;
    if v > 0.0 && v < 1.0 { Ok(v) } else { Err(format!("must be in (0, 1), got {text}")) }
}

/// A share in [0, 1) (poisoning and label-noise rates).
pub fn unit_share(text: &str) -> Result<f64, String> {
    let v = number(text)?;
    if (0.0..1.0).contains(&v) { Ok(v) } else { Err(format!("must be in [0, 1), got {text}")) }
}

/// An integer ≥ 1 (iterations, batch sizes, counts).
pub fn at_least_one(text: &str) -> Result<usize, String> {
    match text.trim().parse::<i128>() {
        Ok(v) if v >= 1 && v <= usize::MAX as i128 => Ok(v as usize),
        Ok(_) => Err(format!("must be an integer ≥ 1, got {text}")),
        Err(_) => Err(format!("`{text}` is not an integer")),
    }
}

/// `I/N` with 0 ≤ I < N: one part of a job split across N machines (`--shard`).
pub fn part(text: &str) -> Result<(usize, usize), String> {
    let bad = || format!("takes I/N with 0 ≤ I < N, got `{text}`");
    let (i, n) = text.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked_with_the_range_in_the_message() {
        assert_eq!(non_negative("0").unwrap(), 0.0);
        assert!(non_negative("-1").unwrap_err().contains("≥ 0"));
        assert!(non_negative("inf").is_err() && non_negative("nan").is_err());
        assert!(positive("0").unwrap_err().contains("> 0"));
        assert_eq!(at_least_one("3").unwrap(), 3);
        assert!(at_least_one("0").unwrap_err().contains("≥ 1"));
        assert!(at_least_one("-2").unwrap_err().contains("≥ 1"));
        assert!(open_unit("1").is_err() && open_unit("0.5").is_ok());
        assert!(unit_share("0").is_ok() && unit_share("1").is_err());
        assert_eq!(part("1/3").unwrap(), (1, 3));
        assert!(part("3/3").is_err() && part("0/0").is_err() && part("x").is_err());
    }
}
