//! `dlsr tail`: print the daemon's verdicts and dead letters as they are in Kafka. The
//! reading and the line format are in [`crate::stream::tail`]; this module picks the
//! brokers and topics (flags over the daemon's configuration) and prints.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

use crate::audit::topic::parse_time;
use crate::config::Config;
use crate::stream::tail::{classify, human_line, json_record, Tail, TailOptions, TailStart, Tally};

#[derive(Debug, Args)]
pub struct TailArgs {
    /// The daemon's configuration: brokers, security and the two output topics come from
    /// it (without it: the built-in defaults and `DLSR__*` environment variables, as for
    /// `serve`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Bootstrap servers (instead of the configuration's `kafka.brokers`).
    #[arg(long)]
    pub brokers: Option<String>,
    /// Only the verdict topic (`kafka.output_topic`).
    #[arg(long, conflicts_with = "dead_letters")]
    pub verdicts: bool,
    /// Only the dead-letter topic (`kafka.dead_letter_topic`).
    #[arg(long, conflicts_with = "audit")]
    pub dead_letters: bool,
    /// Only the window audit's records (`audit.summary_topic`), one line per window.
    #[arg(long, conflicts_with = "verdicts")]
    pub audit: bool,
    /// Read these topics instead (repeatable).
    #[arg(long = "topic", value_name = "TOPIC", conflicts_with_all = ["verdicts", "dead_letters", "audit"])]
    pub topics: Vec<String>,
    /// beginning, end, or a time: RFC 3339, milliseconds since the epoch, or a duration
    /// ago (90s, 30m, 6h, 7d). Default: beginning, or end with --follow.
    #[arg(long, value_name = "WHERE")]
    pub from: Option<String>,
    /// Keep printing new records until Ctrl-C (otherwise stop once caught up).
    #[arg(long, short)]
    pub follow: bool,
    /// One JSON object per record instead of a line of text.
    #[arg(long)]
    pub json: bool,
    /// Stop after N records.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Seconds the brokers may stay silent before tail gives up (exit 1).
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
    /// Extra librdkafka property, KEY=VALUE (repeatable; e.g. security settings).
    #[arg(short = 'X', value_parser = super::stream_cmds::parse_kv)]
    pub properties: Vec<(String, String)>,
}

fn parse_from(text: Option<&str>, follow: bool) -> anyhow::Result<TailStart> {
    let now = crate::kafka::message::now_millis();
    Ok(match text {
        None if follow => TailStart::End,
        None | Some("beginning") => TailStart::Beginning,
        Some("end") => TailStart::End,
        Some(t) => {
            TailStart::Time(parse_time(t, now).map_err(|e| anyhow::anyhow!("--from: {e}, beginning or end"))?)
        }
    })
}

pub fn run(args: &TailArgs, quiet: bool) -> anyhow::Result<()> {
    if args.limit == Some(0) {
        bail!("--limit 0 reads nothing");
    }
    let cfg = Config::load(args.config.as_deref())?;
    let mut kafka = cfg.kafka.clone();
    if let Some(b) = &args.brokers {
        kafka.brokers = b.clone();
    }
    let topics = if !args.topics.is_empty() {
        args.topics.clone()
    } else if args.verdicts {
        vec![kafka.output_topic.clone()]
    } else if args.dead_letters {
        vec![kafka.dead_letter_topic.clone()]
    } else if args.audit {
        if cfg.audit.summary_topic.trim().is_empty() {
            bail!("audit.summary_topic is \"\" in the configuration: the daemon publishes no window records");
        }
        vec![cfg.audit.summary_topic.clone()]
    } else {
        vec![kafka.output_topic.clone(), kafka.dead_letter_topic.clone()]
    };
    let from = parse_from(args.from.as_deref(), args.follow)?;
    let mut connection = crate::kafka::settings::connection_config(&kafka)?;
    for (k, v) in &args.properties {
        connection.set(k, v);
    }
    if !quiet {
        let config = args.config.as_ref().map_or_else(
            || "built-in defaults and DLSR__* environment".to_string(),
            |p| p.display().to_string(),
        );
        let start = match (args.from.as_deref(), from) {
            (_, TailStart::Beginning) => "the beginning".to_string(),
            (_, TailStart::End) => "the end".to_string(),
            (Some(t), TailStart::Time(_)) => t.to_string(),
            (None, TailStart::Time(ms)) => ms.to_string(),
        };
        eprintln!(
            "tail: {} on {} from {start}{} (config: {config})",
            topics.join(", "),
            kafka.brokers,
            if args.follow { ", following (Ctrl-C stops)" } else { "" }
        );
    }
    let options = TailOptions {
        connection,
        brokers: kafka.brokers.clone(),
        topics,
        from,
        follow: args.follow,
        timeout: Duration::from_secs(args.timeout.max(1)),
    };
    let mut tail = Tail::open(&options).map_err(|e| match e {
        crate::kafka::topics::TopicError::NoTopic(t) => anyhow::anyhow!(
            "no such topic on the brokers: {t} (the daemon has not published to it yet, or \
             --config/--topic names another)"
        ),
        e => anyhow::Error::new(e),
    })?;
    for t in &tail.missing {
        eprintln!(
            "tail: topic {t} does not exist yet (nothing written to it so far); reading the others{}",
            if args.follow { ": restart tail to read it once it exists" } else { "" }
        );
    }
    let stop: &AtomicBool = crate::shutdown::interrupt_flag();
    let colour = !args.json && std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let mut tally = Tally::default();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut write_error = None;
    let result = tail.run(stop, |record| {
        let kind = classify(&record);
        tally.add(&kind);
        let line = if args.json {
            json_record(&record, &kind).to_string()
        } else {
            human_line(&record, &kind, colour)
        };
        // Following, each line shows at once; otherwise lines are buffered.
        let written = writeln!(out, "{line}").and_then(|()| if args.follow { out.flush() } else { Ok(()) });
        if let Err(e) = written {
            write_error = Some(e);
            return false;
        }
        args.limit.is_none_or(|n| tally.records < n)
    });
    let flushed = out.flush();
    match write_error.map_or(flushed, Err) {
        // A closed pipe (`dlsr tail | head`) is the reader's choice, not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
        other => other.context("writing to stdout")?,
    }
    result?;
    if !quiet {
        eprintln!("tail: {tally}");
        if tail.skipped_before_start > 0 {
            eprintln!(
                "tail: {} records the brokers returned from before the start point were left out",
                tail.skipped_before_start
            );
        }
    }
    if tally.records == 0 && matches!(from, TailStart::Beginning) && !args.follow && !quiet {
        eprintln!("tail: the topics are empty");
    }
    Ok(())
}
