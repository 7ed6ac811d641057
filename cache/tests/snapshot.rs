//! Snapshots: layers unpacked one by one as overlayfs lower directories, verified against
//! their diff ids, shared between images, and pruned when no image needs them.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use oci_spec::image::{ImageConfigurationBuilder, RootFsBuilder};
use rbuild_cache::layer::{LayerOptions, LayerSource, create_layer};
use rbuild_cache::snapshot::{SnapshotError, prepare_image};
use rbuild_cache::{Reference, Store, Target, gc};

fn layer(store: &Store, tree: &Path, source: LayerSource) -> (Target, String) {
    let options = LayerOptions {
        source,
        ..LayerOptions::default()
    };
    let layer = create_layer(tree, &options, store.content()).unwrap();
    let target = Target {
        media_type: layer.media_type.to_string(),
        digest: layer.digest,
        size: layer.size,
    };
    (target, layer.diff_id.to_string())
}

fn image(store: &Store, layers: &[(Target, String)]) -> Target {
    let config = ImageConfigurationBuilder::default()
        .architecture("amd64")
        .os("linux")
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(
                    layers
                        .iter()
                        .map(|layer| layer.1.clone())
                        .collect::<Vec<_>>(),
                )
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let targets: Vec<Target> = layers.iter().map(|layer| layer.0.clone()).collect();
    store.write_image(&config, &targets).unwrap()
}

#[test]
fn layers_become_overlay_lower_directories_and_are_pruned_with_their_image() {
    let directory = tempfile::tempdir().unwrap();
    let store = Store::open(&directory.path().join("root")).unwrap();
    let base = directory.path().join("base");
    fs::create_dir_all(base.join("etc/app")).unwrap();
    fs::write(base.join("etc/app/config"), "one").unwrap();
    fs::write(base.join("removed"), "gone in the next layer").unwrap();
    let upper = directory.path().join("upper");
    fs::create_dir_all(upper.join("etc/app")).unwrap();
    fs::write(upper.join("etc/app/new"), "two").unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        upper.join("removed"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::empty(),
        rustix::fs::makedev(0, 0),
    )
    .unwrap();
    rustix::fs::setxattr(
        upper.join("etc/app"),
        "trusted.overlay.opaque",
        b"y",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let layers = [
        layer(&store, &base, LayerSource::Directory),
        layer(&store, &upper, LayerSource::OverlayUpper),
    ];
    let target = image(&store, &layers);
    store
        .set_tag(&Reference::parse("layered").unwrap(), &target)
        .unwrap();

    let snapshots = prepare_image(&store, &store.image(&target).unwrap()).unwrap();
    assert_eq!(snapshots.len(), 2);
    assert_eq!(
        fs::read_to_string(snapshots[0].join("etc/app/config")).unwrap(),
        "one"
    );
    let whiteout = fs::symlink_metadata(snapshots[1].join("removed")).unwrap();
    assert!(whiteout.file_type().is_char_device() && whiteout.rdev() == 0);
    let mut opaque = [0u8; 4];
    let length = rustix::fs::getxattr(
        snapshots[1].join("etc/app"),
        "trusted.overlay.opaque",
        &mut opaque,
    )
    .unwrap();
    assert_eq!(&opaque[..length], b"y");
    // Prepared once: a second call reuses the directories.
    assert_eq!(
        prepare_image(&store, &store.image(&target).unwrap()).unwrap(),
        snapshots
    );

    // Still named: prune keeps the snapshots; unnamed: prune removes them.
    gc::prune(&store, false).unwrap();
    assert!(snapshots[1].is_dir());
    store
        .remove_record(&store.find("layered").unwrap()[0])
        .unwrap();
    let report = gc::prune(&store, false).unwrap();
    assert_eq!(report.snapshots_removed, 2);
    assert!(!snapshots[0].exists());
}

#[test]
fn a_layer_that_does_not_match_its_diff_id_leaves_no_snapshot() {
    let directory = tempfile::tempdir().unwrap();
    let store = Store::open(&directory.path().join("root")).unwrap();
    let tree = directory.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("file"), "content").unwrap();
    let (target, _) = layer(&store, &tree, LayerSource::Directory);
    let lying = rbuild_cache::Digest::of(b"not this layer").to_string();
    let image_target = image(&store, &[(target, lying.clone())]);
    let error = prepare_image(&store, &store.image(&image_target).unwrap()).unwrap_err();
    assert!(
        matches!(
            error,
            SnapshotError::Mismatch { .. } | SnapshotError::Apply { .. }
        ),
        "{error}"
    );
    let left: Vec<_> = fs::read_dir(store.snapshots_directory()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}
