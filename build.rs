//! Build script: compiles the CUDA kernels under `kernels/` twice.
//!
//! 1. For the GPU, with nvcc when one is found (`NVCC`, `CUDA_HOME` / `CUDA_PATH`, `PATH`, the PyPI wheel that
//!    `scripts/install-cuda.sh` puts in `.cuda/`, or the Python site-packages): PTX for compute_80 (any GPU
//!    since Ampere; the driver JIT-compiles it) and, where ptxas can, an sm_90a cubin (Hopper, no JIT). Both
//!    are embedded. A kernel that nvcc rejects fails the build: CI installs nvcc so that every run compiles
//!    every kernel. Without nvcc the build still succeeds: the sources are embedded for NVRTC at run time,
//!    with a cargo warning. ptxas' register and spill report goes to `$OUT_DIR/ptxas.log`; spills also
//!    become a cargo warning, because a spilling kernel is a performance bug a developer must see.
//! 2. For the host emulation (kernels/emu), with the host C++ compiler, linked into the crate: the unchanged
//!    kernel sources run on the CPU in `cargo test`, which is how CI checks them without a GPU.
//!
//! It also generates `$OUT_DIR/kernels.rs`: for each module its kernel names and the embedded images.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Module {
    name: String,
    path: PathBuf,
    kernels: Vec<String>,
}

/// Kernel entry points of a `.cu` source: every `__global__` function (they are all `extern "C"`).
fn kernel_names(src: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = src;
    while let Some(pos) = rest.find("__global__") {
        rest = &rest[pos + "__global__".len()..];
        let mut s = rest.trim_start();
        let Some(after_void) = s.strip_prefix("void") else {
            continue;
        };
        s = after_void.trim_start();
        if let Some(lb) = s.strip_prefix("__launch_bounds__") {
            let Some(close) = lb.find(')') else { continue };
            s = lb[close + 1..].trim_start();
        }
        let name: String = s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !name.is_empty() && s[name.len()..].trim_start().starts_with('(') {
            names.push(name);
        }
    }
    names
}

/// The source with the project's own `#include "x.cuh"` inlined (once each), for NVRTC, which is given one
/// string and no file system.
fn inline_includes(path: &Path, dir: &Path, seen: &mut Vec<PathBuf>) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim();
        if let Some(inc) = t.strip_prefix("#include \"").and_then(|r| r.strip_suffix('"')) {
            let p = dir.join(inc);
            if !seen.contains(&p) {
                seen.push(p.clone());
                out.push_str(&inline_includes(&p, dir, seen));
            }
        } else if t == "#pragma once" {
            continue;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    let works = |p: &Path| p.is_file();
    if let Some(p) = std::env::var_os("NVCC").map(PathBuf::from) {
        if works(&p) {
            return Some(p);
        }
        println!("cargo:warning=NVCC={} is not a file; looking elsewhere", p.display());
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var) {
            let p = PathBuf::from(home).join("bin/nvcc");
            if works(&p) {
                return Some(p);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("nvcc");
            if works(&p) {
                return Some(p);
            }
        }
    }
    let wheel = root.join(".cuda/nvidia/cu13/bin/nvcc");
    if works(&wheel) {
        return Some(wheel);
    }
    // A `pip install nvidia-cuda-nvcc` into the running Python.
    let purelib = Command::new("python3")
        .args(["-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    purelib.map(|d| d.join("nvidia/cu13/bin/nvcc")).filter(|p| works(p))
}

/// Runs nvcc; on failure the build fails with nvcc's message (a kernel that does not compile is a bug).
fn nvcc(nvcc: &Path, args: &[&str], what: &str) -> String {
    let out = Command::new(nvcc).args(args).output().unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        panic!("nvcc failed on {what}:\n{log}");
    }
    log
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let kdir = root.join("kernels");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "CAGE_NO_NVCC"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let pins = root.join(".cuda/.cage-pins");
    if pins.exists() {
        println!("cargo:rerun-if-changed={}", pins.display());
    }

    let mut modules: Vec<Module> = std::fs::read_dir(&kdir)
        .expect("kernels/ directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .map(|path| {
            let src = std::fs::read_to_string(&path).unwrap();
            Module { name: path.file_stem().unwrap().to_string_lossy().into_owned(), kernels: kernel_names(&src), path }
        })
        .collect();
    modules.sort_by(|a, b| a.name.cmp(&b.name));

    // GPU images. CAGE_NO_NVCC=1 forces the NVRTC path (to test it on a machine that has nvcc).
    let nvcc_path = if std::env::var_os("CAGE_NO_NVCC").is_some() { None } else { find_nvcc(&root) };
    let inc = format!("-I{}", kdir.display());
    let mut ptxas_log = String::new();
    let mut have_cubin = vec![false; modules.len()];
    if let Some(nv) = &nvcc_path {
        let results: Vec<(String, Option<String>)> = std::thread::scope(|s| {
            let handles: Vec<_> = modules
                .iter()
                .map(|m| {
                    let (inc, out, nv) = (&inc, &out, nv);
                    s.spawn(move || {
                        let src = m.path.to_str().unwrap();
                        let ptx = out.join(format!("{}.ptx", m.name));
                        nvcc(
                            nv,
                            &[
                                "-ptx",
                                "-arch=compute_80",
                                "-O3",
                                "-lineinfo",
                                "-std=c++17",
                                inc,
                                "-o",
                                ptx.to_str().unwrap(),
                                src,
                            ],
                            &format!("{} (PTX)", m.name),
                        );
                        let cubin = out.join(format!("{}.sm_90a.cubin", m.name));
                        let args = [
                            "-cubin",
                            "-arch=sm_90a",
                            "-O3",
                            "-lineinfo",
                            "-std=c++17",
                            "-Xptxas",
                            "-v",
                            inc,
                            "-o",
                            cubin.to_str().unwrap(),
                            src,
                        ];
                        // The PTX is what every build needs; a cubin is a bonus, so its failure is not fatal.
                        let out = Command::new(nv).args(args).output().ok();
                        let log = out.filter(|o| o.status.success()).map(|o| {
                            format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
                        });
                        (m.name.clone(), log)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("nvcc thread")).collect()
        });
        let mut spills = Vec::new();
        for (i, (name, log)) in results.into_iter().enumerate() {
            let Some(log) = log else {
                println!("cargo:warning=cage: no sm_90a cubin for {name} (ptxas failed); the PTX is used");
                continue;
            };
            have_cubin[i] = true;
            let _ = writeln!(ptxas_log, "== {name} (sm_90a)\n{log}");
            // ptxas prints "Compiling entry function 'k'" then "N bytes spill stores, M bytes spill loads".
            let mut current = String::new();
            for line in log.lines() {
                if let Some(p) = line.find("entry function '") {
                    current = line[p + 16..].split('\'').next().unwrap_or("").to_string();
                }
                if line.contains("spill stores") && !line.contains(" 0 bytes spill stores, 0 bytes spill loads") {
                    spills.push(format!("{current}: {}", line.trim()));
                }
            }
        }
        let log_path = out.join("ptxas.log");
        std::fs::write(&log_path, &ptxas_log).unwrap();
        if !spills.is_empty() {
            println!(
                "cargo:warning=cage: {} kernel(s) spill registers on sm_90a (details in {}): {}",
                spills.len(),
                log_path.display(),
                spills.join("; ")
            );
        }
    } else {
        println!(
            "cargo:warning=cage: nvcc not found (set NVCC or run scripts/install-cuda.sh): CUDA kernels embedded as \
             source and compiled with NVRTC at run time"
        );
    }

    // $OUT_DIR/kernels.rs
    let mut table = String::from("// Generated by build.rs.\n");
    let _ = writeln!(table, "/// Path of the nvcc that compiled the kernels, if any.");
    let _ =
        writeln!(table, "pub const NVCC: Option<&str> = {:?};", nvcc_path.as_ref().map(|p| p.display().to_string()));
    let _ = writeln!(table, "/// Every kernel module with its entry points and images.");
    let _ = writeln!(table, "pub const MODULES: &[KernelModule] = &[");
    for (i, m) in modules.iter().enumerate() {
        let nvrtc_src = out.join(format!("{}.nvrtc.cu", m.name));
        std::fs::write(&nvrtc_src, inline_includes(&m.path, &kdir, &mut Vec::new())).unwrap();
        let ptx = nvcc_path.as_ref().map(|_| out.join(format!("{}.ptx", m.name)));
        let cubin = have_cubin[i].then(|| out.join(format!("{}.sm_90a.cubin", m.name)));
        let _ = writeln!(
            table,
            "    KernelModule {{ name: {:?}, kernels: &{:?}, ptx: {}, cubin_sm90a: {}, source: include_str!({:?}) }},",
            m.name,
            m.kernels,
            ptx.map_or("None".into(), |p| format!("Some(include_str!({:?}))", p.display().to_string())),
            cubin.map_or("None".into(), |p| format!("Some(include_bytes!({:?}))", p.display().to_string())),
            nvrtc_src.display().to_string()
        );
    }
    table.push_str("];\n");
    std::fs::write(out.join("kernels.rs"), table).unwrap();

    // Host emulation: one translation unit with every kernel and a table from kernel name to launcher.
    let mut emu = String::from("// Generated by build.rs.\n#include \"emu/cuda_emu.h\"\n");
    for m in &modules {
        let _ = writeln!(emu, "#include \"{}\"", m.path.display());
    }
    emu.push_str("namespace {\ntemplate <auto K> void launcher(dim3 g, dim3 b, size_t s, unsigned c, void** a) { cage_emu::launch(K, g, b, s, c, a); }\n");
    emu.push_str("template <auto K> int sizes(size_t* out, int max) { return cage_emu::param_sizes(K, out, max); }\n");
    emu.push_str(
        "struct Entry { const char* name; void (*run)(dim3, dim3, size_t, unsigned, void**); int (*sizes)(size_t*, int); };\nconst Entry kTable[] = {\n",
    );
    for m in &modules {
        for k in &m.kernels {
            let _ = writeln!(emu, "  {{\"{k}\", &launcher<&{k}>, &sizes<&{k}>}},");
        }
    }
    emu.push_str(
        "};\n}  // namespace\n\
         // Returns 0, or -1 for an unknown kernel name.\n\
         extern \"C\" int cage_emu_launch(const char* name, const unsigned* grid, const unsigned* block, size_t smem, unsigned cluster, void** args) {\n\
         \x20 for (const Entry& e : kTable)\n\
         \x20   if (strcmp(e.name, name) == 0) { e.run(dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]), smem, cluster, args); return 0; }\n\
         \x20 return -1;\n}\n\
         // The byte size of each of kernel `name`'s parameters (what a graph capture copies), at most `max`:\n\
         // returns their number, or -1 for an unknown kernel or more than `max` parameters.\n\
         extern \"C\" int cage_emu_param_sizes(const char* name, size_t* out, int max) {\n\
         \x20 for (const Entry& e : kTable)\n\
         \x20   if (strcmp(e.name, name) == 0) return e.sizes(out, max);\n\
         \x20 return -1;\n}\n",
    );
    let emu_path = out.join("emu_all.cpp");
    std::fs::write(&emu_path, emu).unwrap();
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .debug(false)
        .include(&kdir)
        .file(&emu_path)
        .file(kdir.join("emu/cuda_emu.cpp"))
        .flag_if_supported("-Wno-clobbered")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-fno-strict-aliasing")
        .warnings(false)
        .compile("cage_emu");
}
