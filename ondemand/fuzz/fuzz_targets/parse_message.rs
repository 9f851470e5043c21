//! Any bytes the kernel (or a corrupted kernel) could hand us: parsing never panics, and
//! whatever parses re-encodes consistently with the declared length.
#![no_main]

use lazy_erofs_ondemand::cachefiles::msg::{self, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = msg::msg_id(data);
    let fd = msg::open_fd(data);
    match msg::parse(data) {
        Ok(Message::Open(open)) => {
            assert!(fd.is_some(), "a parsed OPEN always carries an fd field");
            assert_eq!(
                data.len(),
                msg::MSG_HEADER_LEN
                    + msg::OPEN_HEADER_LEN
                    + open.volume_key.len()
                    + 1
                    + open.cookie_key.len()
            );
        }
        Ok(Message::Read(read)) => {
            assert_eq!(data.len(), msg::MSG_HEADER_LEN + msg::READ_BODY_LEN);
            assert!(read.offset.checked_add(read.len).is_some());
        }
        Ok(Message::Close(_)) => assert_eq!(data.len(), msg::MSG_HEADER_LEN),
        Err(_) => {}
    }
});
