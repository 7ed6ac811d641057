//! The image commands: `images`, `inspect`, `tag`, `rmi`, `save`, `load`, `import`, `prune`,
//! `du` and `verify`. Each opens the store under `--root`, does one thing, prints data to
//! stdout and messages to stderr.

use std::error::Error;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use rbuild_cache::archive::{self, ImportOptions, SaveItem};
use rbuild_cache::{Image, ImageRecord, Reference, Store, StoreError, gc, time};

use crate::cli::{CommandLine, ListFormat};
use crate::options::Status;

/// Runs an image command against the store under `root`.
pub fn run(root: &Path, command: CommandLine) -> Status {
    let store = match Store::open(root) {
        Ok(store) => store,
        Err(error) => return fail(&error),
    };
    match command {
        CommandLine::Build(_)
        | CommandLine::Run(_)
        | CommandLine::Pull(_)
        | CommandLine::Push(_)
        | CommandLine::Login(_)
        | CommandLine::Logout(_) => {
            unreachable!("build, run, pull, push, login and logout have their own modules")
        }
        CommandLine::Images(arguments) => images(&store, arguments.quiet, arguments.format),
        CommandLine::Inspect(arguments) => inspect(&store, &arguments.images),
        CommandLine::Tag(arguments) => tag(&store, &arguments.source, &arguments.target),
        CommandLine::Rmi(arguments) => rmi(&store, &arguments.images, arguments.force),
        CommandLine::Save(arguments) => {
            save(&store, &arguments.images, arguments.output.as_deref())
        }
        CommandLine::Load(arguments) => load(&store, arguments.input.as_deref(), arguments.quiet),
        CommandLine::Import(arguments) => import(&store, &arguments.file, &arguments.reference),
        CommandLine::Prune(arguments) => prune(&store, arguments.all),
        CommandLine::Du(arguments) => du(&store, arguments.format),
        CommandLine::Verify => verify(&store),
    }
}

/// Prints an error with its chain of causes and returns [`Status::Failure`].
pub fn fail(error: &dyn Error) -> Status {
    eprintln!("error: {}", chain(error));
    Status::Failure
}

/// An error with its chain of causes, on one line.
pub fn chain_text(error: &dyn Error) -> String {
    chain(error)
}

fn chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn usage(message: &str) -> Status {
    eprintln!("error: {message}");
    Status::Usage
}

fn print(text: &str) -> Status {
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Status::Success,
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => Status::Success,
        Err(error) => fail(&error),
    }
}

/// Sizes as Docker prints them: decimal units, three significant digits.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "kB", "MB", "GB", "TB", "PB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else if value < 10.0 {
        format!("{value:.2}{}", UNITS[unit])
    } else if value < 100.0 {
        format!("{value:.1}{}", UNITS[unit])
    } else {
        format!("{value:.0}{}", UNITS[unit])
    }
}

fn ago(created: Option<&String>) -> String {
    let Some(created) = created.and_then(|text| time::parse_rfc3339(text)) else {
        return "N/A".to_string();
    };
    let now = rbuild_cache::store::now() as i64;
    let seconds = (now - created).max(0);
    let (count, unit) = match seconds {
        0..60 => return "Less than a minute ago".to_string(),
        60..3600 => (seconds / 60, "minute"),
        3600..86_400 => (seconds / 3600, "hour"),
        86_400..604_800 => (seconds / 86_400, "day"),
        604_800..2_592_000 => (seconds / 604_800, "week"),
        2_592_000..31_536_000 => (seconds / 2_592_000, "month"),
        _ => (seconds / 31_536_000, "year"),
    };
    format!("{count} {unit}{} ago", if count == 1 { "" } else { "s" })
}

/// Finds exactly one image for the user's words.
fn find_one(store: &Store, text: &str) -> Result<(Vec<ImageRecord>, Image), StoreError> {
    let records = store.find(text)?;
    let image = store.image(&records[0].target)?;
    Ok((records, image))
}

fn images(store: &Store, quiet: bool, format: ListFormat) -> Status {
    let records = match store.records() {
        Ok(records) => records,
        Err(error) => return fail(&error),
    };
    let mut rows = Vec::new();
    for record in &records {
        let image = match store.image(&record.target) {
            Ok(image) => image,
            Err(error) => {
                let name = record.name.as_deref().unwrap_or("<none>");
                eprintln!("warning: image {name} is broken: {}", chain(&error));
                continue;
            }
        };
        let reference = record.reference();
        let repository = reference
            .as_ref()
            .map_or("<none>".to_string(), Reference::familiar_name);
        let tag = reference
            .as_ref()
            .and_then(|name| name.tag().map(str::to_string));
        rows.push((
            repository,
            tag.unwrap_or_else(|| "<none>".to_string()),
            image,
        ));
    }
    if quiet {
        let mut ids: Vec<String> = rows
            .iter()
            .map(|row| row.2.id().short().to_string())
            .collect();
        ids.dedup();
        return print(&ids.iter().map(|id| format!("{id}\n")).collect::<String>());
    }
    if format == ListFormat::Json {
        let json: Vec<_> = rows
            .iter()
            .map(|(repository, tag, image)| {
                serde_json::json!({
                    "repository": repository,
                    "tag": tag,
                    "id": image.id(),
                    "digest": image.target.digest,
                    "created": image.config.created(),
                    "size": image.size(),
                })
            })
            .collect();
        return print(&(serde_json::to_string_pretty(&json).expect("json") + "\n"));
    }
    let table: Vec<[String; 5]> = rows
        .iter()
        .map(|(repository, tag, image)| {
            [
                repository.clone(),
                tag.clone(),
                image.id().short().to_string(),
                ago(image.config.created().as_ref()),
                human_size(image.size()),
            ]
        })
        .collect();
    let header = ["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"].map(str::to_string);
    print(&columns(std::iter::once(&header).chain(&table)))
}

fn columns<'a>(rows: impl Iterator<Item = &'a [String; 5]> + Clone) -> String {
    let mut widths = [0; 5];
    for row in rows.clone() {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for row in rows {
        let mut line = String::new();
        for (index, cell) in row.iter().enumerate() {
            if index + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}   ", width = widths[index]));
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

fn inspect(store: &Store, names: &[String]) -> Status {
    let mut documents = Vec::new();
    for name in names {
        let (records, image) = match find_one(store, name) {
            Ok(found) => found,
            Err(error) => return fail(&error),
        };
        let mut document: serde_json::Map<String, serde_json::Value> =
            match serde_json::from_slice(&image.config_bytes) {
                Ok(serde_json::Value::Object(map)) => map,
                _ => serde_json::Map::new(),
            };
        let mut names: Vec<String> = match store.records() {
            Ok(all) => all
                .into_iter()
                .filter(|record| record.target.digest == image.target.digest)
                .filter_map(|record| record.name)
                .collect(),
            Err(error) => return fail(&error),
        };
        names.dedup();
        let manifest: serde_json::Value =
            serde_json::from_slice(&image.manifest_bytes).unwrap_or(serde_json::Value::Null);
        let mut head = serde_json::Map::new();
        head.insert("name".into(), records[0].name.clone().into());
        head.insert("names".into(), names.into());
        head.insert("id".into(), image.id().to_string().into());
        head.insert("digest".into(), image.target.digest.to_string().into());
        head.insert("media_type".into(), image.target.media_type.clone().into());
        head.insert(
            "config_digest".into(),
            image.config_target.digest.to_string().into(),
        );
        head.insert("size".into(), image.size().into());
        head.insert("manifest".into(), manifest);
        head.append(&mut document);
        documents.push(serde_json::Value::Object(head));
    }
    let json = if documents.len() == 1 {
        documents.remove(0)
    } else {
        documents.into()
    };
    print(&(serde_json::to_string_pretty(&json).expect("json") + "\n"))
}

fn tag(store: &Store, source: &str, target: &str) -> Status {
    let reference = match Reference::parse(target) {
        Ok(reference) => reference,
        Err(error) => return usage(&error.to_string()),
    };
    if reference.digest().is_some() {
        return usage(&format!(
            "invalid tag {target:?}: a tag cannot carry a digest"
        ));
    }
    let result = store
        .find(source)
        .and_then(|records| store.set_tag(&reference, &records[0].target));
    match result {
        Ok(()) => Status::Success,
        Err(error) => fail(&error),
    }
}

fn rmi(store: &Store, names: &[String], force: bool) -> Status {
    let mut status = Status::Success;
    for name in names {
        let records = match store.find(name) {
            Ok(records) => records,
            Err(error) => {
                status = fail(&error);
                continue;
            }
        };
        let by_name = Reference::parse(name).is_ok_and(|reference| {
            records.len() == 1 && records[0].name.as_deref() == Some(&reference.to_string())
        });
        if !by_name && records.len() > 1 && !force {
            let names: Vec<_> = records
                .iter()
                .filter_map(|record| record.name.clone())
                .collect();
            eprintln!(
                "error: image {name} has several names ({}): remove them by name, or use --force",
                names.join(", ")
            );
            status = Status::Failure;
            continue;
        }
        for record in &records {
            match store.remove_record(record) {
                Ok(_) => println!(
                    "Untagged: {}",
                    record
                        .reference()
                        .map_or(record.target.digest.to_string(), |r| r.familiar())
                ),
                Err(error) => status = fail(&error),
            }
        }
    }
    if status == Status::Success {
        eprintln!("the content is deleted by the next `rbuild prune`");
    }
    status
}

fn save(store: &Store, names: &[String], output: Option<&Path>) -> Status {
    let mut items = Vec::new();
    for name in names {
        let (records, image) = match find_one(store, name) {
            Ok(found) => found,
            Err(error) => return fail(&error),
        };
        // Saved by name: that name; saved by id: every name the image has.
        let named = Reference::parse(name).ok().and_then(|reference| {
            records
                .iter()
                .find(|record| record.name.as_deref() == Some(&reference.to_string()))
        });
        let references: Vec<Option<Reference>> = match named {
            Some(record) => vec![record.reference()],
            None if records.iter().any(|record| record.name.is_some()) => records
                .iter()
                .filter_map(ImageRecord::reference)
                .map(Some)
                .collect(),
            None => vec![None],
        };
        // An image that only names some layers (a lazily pulled base) gets them now.
        if let Err(error) = crate::registry::fetch_layers(store, &image) {
            return fail(&error);
        }
        for reference in references {
            items.push(SaveItem {
                reference,
                image: image.clone(),
            });
        }
    }
    match output {
        Some(path) if path != Path::new("-") => match write_file_atomic(path, |out| {
            archive::save(store, &items, out).map_err(|error| io::Error::other(chain(&error)))
        }) {
            Ok(()) => Status::Success,
            Err(error) => {
                eprintln!("error: writing {}: {error}", path.display());
                Status::Failure
            }
        },
        _ => {
            if io::stdout().is_terminal() {
                return usage(
                    "refusing to write an archive to a terminal: use -o FILE or redirect stdout",
                );
            }
            let stdout = BufWriter::with_capacity(1 << 20, io::stdout().lock());
            match archive::save(store, &items, stdout) {
                Ok(()) => Status::Success,
                Err(error) => fail(&error),
            }
        }
    }
}

/// Writes a file through a temp file beside it, fsync and rename, so a failed or killed
/// write never leaves a partial file at `path`.
fn write_file_atomic(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
) -> io::Result<()> {
    let directory = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other("not a file name"))?;
    let temp: PathBuf = directory.join(format!(
        ".{}.{}.partial",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&temp)?);
        write(&mut out)?;
        let file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

fn open_input(path: Option<&Path>) -> io::Result<Box<dyn Read>> {
    match path {
        Some(path) if path != Path::new("-") => Ok(Box::new(BufReader::with_capacity(
            1 << 20,
            File::open(path)?,
        ))),
        _ => Ok(Box::new(BufReader::with_capacity(
            1 << 20,
            io::stdin().lock(),
        ))),
    }
}

fn load(store: &Store, input: Option<&Path>, quiet: bool) -> Status {
    if input.is_none() && io::stdin().is_terminal() {
        return usage("no archive: use -i FILE or pipe one to standard input");
    }
    let reader = match open_input(input) {
        Ok(reader) => reader,
        Err(error) => {
            eprintln!(
                "error: opening {}: {error}",
                input.unwrap_or(Path::new("-")).display()
            );
            return Status::Failure;
        }
    };
    match archive::load(store, reader) {
        Ok(loaded) => {
            if !quiet {
                for image in loaded {
                    match image.reference {
                        Some(reference) => println!("Loaded image: {}", reference.familiar()),
                        None => println!("Loaded image ID: {}", image.target.digest),
                    }
                }
            }
            Status::Success
        }
        Err(error) => fail(&error),
    }
}

fn import(store: &Store, file: &Path, reference: &str) -> Status {
    let reference = match Reference::parse(reference) {
        Ok(reference) if reference.digest().is_none() => reference,
        Ok(_) => {
            return usage(&format!(
                "invalid name {reference:?}: a name cannot carry a digest"
            ));
        }
        Err(error) => return usage(&error.to_string()),
    };
    let reader = match open_input(Some(file)) {
        Ok(reader) => reader,
        Err(error) => {
            eprintln!("error: opening {}: {error}", file.display());
            return Status::Failure;
        }
    };
    // SOURCE_DATE_EPOCH makes the image reproducible, as it does for builds.
    let created = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(text) => match text.parse::<i64>() {
            Ok(seconds) => seconds,
            Err(_) => {
                return usage(&format!(
                    "SOURCE_DATE_EPOCH={text:?} is not a number of seconds"
                ));
            }
        },
        Err(_) => rbuild_cache::store::now() as i64,
    };
    let options = ImportOptions {
        created: time::rfc3339(created),
        comment: format!(
            "imported from {}",
            file.file_name()
                .map_or("-".into(), |name| name.to_string_lossy())
        ),
    };
    match archive::import(store, reader, &reference, &options) {
        Ok(target) => {
            println!("{}", target.digest);
            Status::Success
        }
        Err(error) => fail(&error),
    }
}

fn prune(store: &Store, all: bool) -> Status {
    match gc::prune(store, all) {
        Ok(report) => {
            if report.cache_records_removed > 0 || all {
                eprintln!(
                    "Deleted {} build cache records",
                    report.cache_records_removed
                );
            }
            if report.snapshots_removed > 0 {
                eprintln!("Deleted {} snapshots", report.snapshots_removed);
            }
            if report.containers_removed > 0 {
                eprintln!("Deleted {} stopped containers", report.containers_removed);
            }
            eprintln!("Deleted {} blobs", report.blobs_removed);
            println!("Total reclaimed space: {}", human_size(report.bytes_freed));
            Status::Success
        }
        Err(error) => fail(&error),
    }
}

fn du(store: &Store, format: ListFormat) -> Status {
    let usage = gc::disk_usage(store);
    if format == ListFormat::Json {
        let parts: Vec<_> = usage
            .parts
            .iter()
            .map(|(name, disk, apparent, files)| {
                serde_json::json!({"part": name, "bytes": disk, "apparent_bytes": apparent, "files": files})
            })
            .collect();
        let json =
            serde_json::json!({"root": store.root(), "total_bytes": usage.total(), "parts": parts});
        return print(&(serde_json::to_string_pretty(&json).expect("json") + "\n"));
    }
    let mut text = String::new();
    let width = usage
        .parts
        .iter()
        .map(|part| part.0.len())
        .max()
        .unwrap_or(5)
        .max(5);
    text.push_str(&format!(
        "{:<width$}   {:>10}   {:>8}\n",
        "PART", "SIZE", "FILES"
    ));
    for (name, disk, _, files) in &usage.parts {
        text.push_str(&format!(
            "{name:<width$}   {:>10}   {files:>8}\n",
            human_size(*disk)
        ));
    }
    text.push_str(&format!(
        "{:<width$}   {:>10}\n",
        "total",
        human_size(usage.total())
    ));
    print(&text)
}

fn verify(store: &Store) -> Status {
    match gc::verify(store) {
        Ok(report) => {
            for error in &report.corrupt {
                eprintln!("error: {}", chain(error));
            }
            for (name, error) in &report.broken_images {
                eprintln!("error: image {name}: {}", chain(error));
            }
            println!(
                "checked {} blobs ({}): {} corrupt, {} broken images",
                report.blobs_checked,
                human_size(report.bytes_checked),
                report.corrupt.len(),
                report.broken_images.len()
            );
            if report.is_clean() {
                Status::Success
            } else {
                Status::Failure
            }
        }
        Err(error) => fail(&error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_like_docker() {
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(1_234), "1.23kB");
        assert_eq!(human_size(12_345_678), "12.3MB");
        assert_eq!(human_size(123_456_789), "123MB");
    }
}
