//! The TotalSegmentator adapter on TotalSegmentator's own outputs
//! (`$TSDISTILL_TEST_DATA/totalseg_example`). Expected voxel counts are the
//! data set README's table (counted with nibabel), not our own output.

use tsdistill::totalseg::{from_folder, from_multilabel, IdTable};

use crate::common::test_data;

fn counts(labels: &[i64]) -> [usize; 14] {
    let mut c = [0; 14];
    for &l in labels {
        c[l as usize] += 1;
    }
    c
}

#[test]
fn multilabel_and_folder_layouts_map_to_btcv_ids() {
    let dir = test_data().join("totalseg_example");
    let ml = from_multilabel(&dir.join("example_seg_fast.nii.gz"), IdTable::V2).unwrap();
    // BTCV order: spleen, kidney R, kidney L, gallbladder, esophagus (absent), liver,
    // stomach, aorta, IVC, portal/splenic, pancreas, adrenal R, adrenal L.
    let want = [
        9630, 3996, 3676, 1349, 0, 39350, 4748, 1174, 1401, 912, 548, 175, 207,
    ];
    let got = counts(&ml.data.to_labels());
    assert_eq!(&got[1..], &want);
    assert_eq!(ml.shape, [122, 101, 30]);
    assert_eq!(ml.affine[0][0], 3.0);
    assert!(
        (ml.affine[0][3] - -177.956).abs() < 1e-3,
        "origin kept: {:?}",
        ml.affine
    );
    // The per-structure folder is the same segmentation (README: Dice 1.0).
    let folder = from_folder(&dir.join("example_seg_fast")).unwrap();
    assert_eq!(folder.shape, ml.shape);
    assert_eq!(folder.affine, ml.affine);
    assert!(
        folder.data.to_labels() == ml.data.to_labels(),
        "layouts disagree"
    );
    // The large CT (force split) has its own counts.
    let big = from_multilabel(
        &dir.join("example_seg_fast_force_split.nii.gz"),
        IdTable::V2,
    )
    .unwrap();
    let want = [
        9668, 7134, 5090, 1319, 0, 41692, 4836, 1839, 2266, 1086, 695, 166, 210,
    ];
    assert_eq!(&counts(&big.data.to_labels())[1..], &want);
    assert_eq!(big.shape, [122, 101, 112]);
}

#[test]
fn v1_table_maps_v1_ids() {
    // v1: aorta 7, IVC 8, portal 9, pancreas 10, adrenals 11/12, esophagus 42.
    let lut = IdTable::V1.lookup();
    assert_eq!(
        (lut[7], lut[8], lut[9], lut[10], lut[11], lut[12], lut[42]),
        (8, 9, 10, 11, 12, 13, 5)
    );
    let v2 = IdTable::V2.lookup();
    assert_eq!(
        (v2[52], v2[63], v2[64], v2[15], v2[7], v2[10]),
        (8, 9, 10, 5, 11, 0)
    );
}

#[test]
fn totalseg_labels_step_turns_a_teacher_run_into_a_dataset() {
    let data = test_data().join("totalseg_example");
    let root = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("totalseg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    // A stand-in for running TotalSegmentator: copy its real output for the case.
    let yaml = format!(
        r#"
steps:
  ct: {{kind: dataset, images: "{d}/example_ct_sm.nii.gz"}}
  teacher:
    kind: case-command
    input: ct
    keep: [image.nii.gz]
    run: cp {d}/example_seg_fast.nii.gz $TSD_OUT/totalseg.nii.gz
  weak: {{kind: totalseg-labels, input: teacher}}
"#,
        d = data.display()
    );
    std::fs::write(root.join("p.yaml"), yaml).unwrap();
    let p = tsdistill::pipeline::load(&root.join("p.yaml"), &[]).unwrap();
    let store = tsdistill::cache::Store::open(&root.join("cache")).unwrap();
    let e = tsdistill::exec::Engine::new(&store, &p, Default::default()).unwrap();
    let s = e
        .run(&tsdistill::exec::RunOptions {
            quiet: true,
            ..Default::default()
        })
        .unwrap();
    assert!(s.ok(), "{:?}", s.record.steps);
    let m = store
        .manifest(s.record.steps["weak"].output.as_ref().unwrap())
        .unwrap();
    let item = store.manifest(&m.items["example_ct_sm"]).unwrap();
    assert_eq!(
        item.files.keys().collect::<Vec<_>>(),
        ["image.nii.gz", "label.nii.gz"]
    );
    let dir = store.object_dir(&m.items["example_ct_sm"]);
    let label = tsdistill::volume::nifti::read(dir.join("label.nii.gz")).unwrap();
    assert_eq!(counts(&label.data.to_labels())[6], 39350, "liver");
    let image = tsdistill::volume::nifti::read(dir.join("image.nii.gz")).unwrap();
    assert_eq!(image.affine, label.affine);
}
