//! Visible output folders: `runs/<pipeline>/<step>/` links into the store so
//! a user can open the NIfTI files in a viewer.

use std::path::Path;

use crate::cache::Store;

/// Points `<dir>/<step>` at a step's output: a symlink to the object, or for
/// collections a folder with one link per case (plus the object's own files).
pub fn link_output(store: &Store, dir: &Path, step: &str, output: &str) -> std::io::Result<()> {
    fs_err::create_dir_all(dir)?;
    let target = dir.join(step);
    let tmp = dir.join(format!(".{step}.{}", crate::cache::store::unique_name()));
    let object = store.object_dir(output);
    // Already pointing at this output (a no-op run): leave it alone.
    let current = std::fs::read_link(&target).or_else(|_| {
        std::fs::read_link(target.join("manifest.json"))
            .map(|p| p.parent().map(Into::into).unwrap_or(p))
    });
    if current.is_ok_and(|c| c == object) {
        return Ok(());
    }
    let manifest = store.manifest(output).map_err(std::io::Error::other)?;
    if manifest.items.is_empty() {
        std::os::unix::fs::symlink(&object, &tmp)?;
    } else {
        fs_err::create_dir_all(&tmp)?;
        for (case, item) in &manifest.items {
            std::os::unix::fs::symlink(store.object_dir(item), tmp.join(case))?;
        }
        for f in manifest.files.keys().filter(|f| !f.contains('/')) {
            std::os::unix::fs::symlink(object.join(f), tmp.join(f))?;
        }
        std::os::unix::fs::symlink(object.join("manifest.json"), tmp.join("manifest.json"))?;
    }
    // Replace the old link or folder (a folder of links: removing it never
    // touches the store).
    match std::fs::symlink_metadata(&target) {
        Ok(m) if m.is_dir() => fs_err::remove_dir_all(&target)?,
        Ok(_) => fs_err::remove_file(&target)?,
        Err(_) => {}
    }
    fs_err::rename(&tmp, &target)
}
