//! Kafka message headers kept byte for byte, whatever their keys hold.
//!
//! A header key on the wire is any bytes; librdkafka's C API and most clients accept
//! them. rdkafka 0.39's header iterator unwraps `CStr::to_str` on every key, so one
//! message whose header key is not UTF-8 panics the thread that reads it (issue #9: the
//! daemon crash-looped on such a message). Here headers are read and written through
//! librdkafka's C API directly, as raw bytes, and never go through that iterator.
//!
//! One limit comes from librdkafka itself: `rd_kafka_header_get_all` returns keys as
//! NUL-terminated strings, so a key is read up to its first 0x00 byte.

use std::ffi::CStr;

use rdkafka::bindings as rdsys;
use rdkafka::message::{BorrowedHeaders, BorrowedMessage, OwnedHeaders};

/// One header: key and value (None: a null value, which Kafka distinguishes from empty).
pub type Header = (Vec<u8>, Option<Vec<u8>>);

/// Every header of a consumed message or a delivery report, in order, byte for byte.
pub fn read(message: &BorrowedMessage<'_>) -> Vec<Header> {
    // SAFETY: the message pointer is valid for the borrow.
    unsafe { read_raw(message.ptr()) }
}

/// [`read`] for a message librdkafka handed over as a pointer (the consumer's own poll).
///
/// # Safety
/// `message` must point to a valid message that outlives the call.
pub unsafe fn read_raw(message: *mut rdsys::rd_kafka_message_t) -> Vec<Header> {
    let mut native: *mut rdsys::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: the headers the message returns are owned by it and only read here.
    let err = unsafe { rdsys::rd_kafka_message_headers(message, &mut native) };
    if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || native.is_null() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for idx in 0.. {
        let mut name: *const std::ffi::c_char = std::ptr::null();
        let mut value: *const std::ffi::c_void = std::ptr::null();
        let mut size = 0usize;
        // SAFETY: `native` is valid (above); get_all writes the three out-pointers.
        let err = unsafe { rdsys::rd_kafka_header_get_all(native, idx, &mut name, &mut value, &mut size) };
        if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            break;
        }
        // SAFETY: librdkafka keeps header names NUL-terminated and values `size` bytes
        // long, both alive as long as the message.
        let key = unsafe { CStr::from_ptr(name) }.to_bytes().to_vec();
        let value = (!value.is_null())
            .then(|| unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) }.to_vec());
        out.push((key, value));
    }
    out
}

/// Headers for a produced record, keys and values exactly as given.
pub fn to_owned(headers: &[Header]) -> OwnedHeaders {
    // SAFETY: a fresh native list, filled with rd_kafka_header_add (which copies its
    // inputs), viewed as rdkafka's BorrowedHeaders (rdkafka's own representation: a
    // reference to the native list), copied into an OwnedHeaders, then destroyed.
    unsafe {
        let native = rdsys::rd_kafka_headers_new(headers.len().max(1));
        for (key, value) in headers {
            let (ptr, len) = match value {
                Some(v) => (v.as_ptr().cast::<std::ffi::c_void>(), v.len() as isize),
                None => (std::ptr::null(), 0),
            };
            rdsys::rd_kafka_header_add(native, key.as_ptr().cast(), key.len() as isize, ptr, len);
        }
        let owned = (*native.cast::<BorrowedHeaders>()).detach();
        rdsys::rd_kafka_headers_destroy(native);
        owned
    }
}

/// The value of the first header named `key`.
pub fn find<'a>(headers: &'a [Header], key: &str) -> Option<&'a [u8]> {
    headers.iter().find(|(k, _)| k == key.as_bytes()).and_then(|(_, v)| v.as_deref())
}

/// Bytes the headers add to a record (keys and values; framing is in the margin).
pub fn payload_len(headers: &[Header]) -> usize {
    headers.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + 8).sum()
}

/// A `dlsr-*` header with a text value.
pub fn text(key: &str, value: impl Into<String>) -> Header {
    (key.as_bytes().to_vec(), Some(value.into().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    #[test]
    fn binary_keys_and_null_values_survive_the_native_list() {
        let headers: Vec<Header> = vec![
            (vec![0xff, 0xfe], Some(b"v".to_vec())),
            (b"plain".to_vec(), None),
            (b"empty".to_vec(), Some(Vec::new())),
        ];
        let owned = to_owned(&headers);
        assert_eq!(owned.count(), 3);
        // Read back without the panicking iterator: through get_all, as `read` does.
        let native = owned.as_borrowed() as *const BorrowedHeaders as *const rdsys::rd_kafka_headers_t;
        let mut name: *const std::ffi::c_char = std::ptr::null();
        let mut value: *const std::ffi::c_void = std::ptr::null();
        let mut size = 0usize;
        let err = unsafe { rdsys::rd_kafka_header_get_all(native, 0, &mut name, &mut value, &mut size) };
        assert_eq!(err, rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
        assert_eq!(unsafe { CStr::from_ptr(name) }.to_bytes(), &[0xff, 0xfe]);
        assert_eq!(size, 1);
        assert_eq!(find(&headers, "empty"), Some(&[][..]));
        assert_eq!(find(&headers, "plain"), None);
    }
}
