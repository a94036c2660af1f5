//! Durations on the command line as people write them: `90` or `90s`, `500ms`, `10m`,
//! `1h30m`, `1.5s`.

use std::time::Duration;

/// clap's parser of a DUR value.
pub(crate) fn duration(v: &str) -> Result<Duration, String> {
    let bad = || {
        format!("{v:?} is not a duration: write e.g. 90s, 500ms, 10m or 1h30m (a bare number is seconds)")
    };
    let v = v.trim();
    if v.is_empty() {
        return Err(bad());
    }
    if let Ok(secs) = v.parse::<f64>() {
        return seconds(secs).ok_or_else(bad);
    }
    let mut total = 0.0;
    let mut rest = v;
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (number, tail) = rest.split_at(split);
        let n: f64 = number.parse().map_err(|_| bad())?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let scale = match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += n * scale;
        rest = next;
    }
    seconds(total).ok_or_else(bad)
}

fn seconds(s: f64) -> Option<Duration> {
    (s.is_finite() && (0.0..1e9).contains(&s)).then(|| Duration::from_secs_f64(s))
}

/// `--restart-on`'s value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ExitCodes(pub(crate) Vec<u8>);

/// `--restart-on`: exit codes separated by commas.
pub(crate) fn exit_codes(v: &str) -> Result<ExitCodes, String> {
    v.split(',')
        .map(|w| {
            w.trim()
                .parse::<u8>()
                .ok()
                .filter(|&c| c > 0)
                .ok_or_else(|| format!("{w:?} is not an exit code (1 to 255); give them separated by commas, e.g. 1,137"))
        })
        .collect::<Result<_, _>>()
        .map(ExitCodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_as_written() {
        let ms = Duration::from_millis;
        for (text, d) in [
            ("90", ms(90_000)),
            ("1.5", ms(1500)),
            ("90s", ms(90_000)),
            ("500ms", ms(500)),
            ("10m", ms(600_000)),
            ("1h30m", ms(5_400_000)),
            ("0.2s", ms(200)),
        ] {
            assert_eq!(duration(text), Ok(d), "{text}");
        }
        for bad in ["", "ten", "10x", "m", "-5", "5 m"] {
            assert!(duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exit_code_lists() {
        assert_eq!(exit_codes("1,137"), Ok(ExitCodes(vec![1, 137])));
        assert!(exit_codes("0").is_err());
        assert!(exit_codes("1,,2").is_err());
        assert!(exit_codes("256").is_err());
    }
}
