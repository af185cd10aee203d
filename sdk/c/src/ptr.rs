//! Every conversion of a pointer received from C, in one place: the only module of the crate
//! with `unsafe` blocks.
//!
//! The functions here trust what the header promises of every argument: a handle pointer is
//! NULL or came from this library's own constructor and was not freed yet; a string is NULL or
//! NUL-terminated; an out-pointer is NULL or points to writable memory of its type; a buffer
//! holds at least the length given with it. NULL is checked for and reported; the rest cannot
//! be checked from here, which is why the header states it for each function.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char, c_void};

use crate::Failure;

/// A handle given to C: the value on the heap, owned by C until its `fwnp_*_free`.
pub(crate) fn into_handle<T>(value: T) -> *mut T {
    Box::into_raw(Box::new(value))
}

/// Takes a handle back from C to drop it. NULL is nothing to free.
pub(crate) fn take_handle<T>(handle: *mut T) -> Option<Box<T>> {
    if handle.is_null() {
        return None;
    }
    // SAFETY: a non-NULL handle came from `into_handle` (Box::into_raw) and C passes it to its
    // free function once, after which it does not use it.
    Some(unsafe { Box::from_raw(handle) })
}

/// Borrows a handle C passed in.
pub(crate) fn handle<'a, T>(handle: *const T, what: &str) -> Result<&'a T, Failure> {
    // SAFETY: a non-NULL handle came from `into_handle` and is alive until its free function;
    // the library never hands out a mutable reference to a handle, and what changes inside one
    // is behind its own locks.
    unsafe { handle.as_ref() }.ok_or_else(|| Failure::null(what))
}

/// Borrows a handle C passed in, to change it (opening builders). C must not use the same
/// opening from two threads at once, as the header says.
pub(crate) fn handle_mut<'a, T>(handle: *mut T, what: &str) -> Result<&'a mut T, Failure> {
    // SAFETY: as in `handle`; the header makes an opening single-threaded, so no other
    // reference to it exists while the call runs.
    unsafe { handle.as_mut() }.ok_or_else(|| Failure::null(what))
}

/// A NUL-terminated UTF-8 string from C; `None` for NULL.
pub(crate) fn opt_str<'a>(text: *const c_char, what: &str) -> Result<Option<&'a str>, Failure> {
    if text.is_null() {
        return Ok(None);
    }
    // SAFETY: a non-NULL string is NUL-terminated and lives for the call, as the header asks.
    let bytes = unsafe { CStr::from_ptr(text) };
    bytes
        .to_str()
        .map(Some)
        .map_err(|_| Failure::invalid(format!("{what} is not valid UTF-8")))
}

/// A string C must give.
pub(crate) fn str_arg<'a>(text: *const c_char, what: &str) -> Result<&'a str, Failure> {
    opt_str(text, what)?.ok_or_else(|| Failure::null(what))
}

/// Stores `value` where C asked for a result.
pub(crate) fn write_out<T>(out: *mut T, value: T, what: &str) -> Result<(), Failure> {
    if out.is_null() {
        return Err(Failure::null(what));
    }
    // SAFETY: a non-NULL out-pointer points to writable, aligned memory of type T (the
    // header's contract); `write` does not read or drop what was there.
    unsafe { out.write(value) };
    Ok(())
}

/// Copies `text` and a terminating NUL into C's buffer of `len` bytes.
pub(crate) fn write_text(
    buf: *mut c_char,
    len: usize,
    text: &str,
    what: &str,
) -> Result<(), Failure> {
    if buf.is_null() {
        return Err(Failure::null(what));
    }
    let needed = text.len() + 1;
    if len < needed {
        return Err(Failure::invalid(format!(
            "{what}: the buffer holds {len} bytes, {needed} are needed"
        )));
    }
    // SAFETY: `buf` points to at least `len` writable bytes (the header's contract) and
    // `len >= text.len() + 1`; the source is a Rust string, which cannot overlap C's buffer.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr().cast::<c_char>(), buf, text.len());
        buf.add(text.len()).write(0);
    }
    Ok(())
}

/// The opaque pointer C gives with a callback, handed back to it as it came.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UserData(pub(crate) *mut c_void);

// SAFETY: the library never reads or writes through the pointer; it only passes it back to C's
// callback, on the library's thread, as the header says. Whether what it points to may be used
// from that thread is C's to ensure, as with any callback argument.
unsafe impl Send for UserData {}
// SAFETY: as for Send: shared references only copy the pointer value.
unsafe impl Sync for UserData {}
