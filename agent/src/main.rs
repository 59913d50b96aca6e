use kspan::capture::{Capture, CaptureOptions, event};
fn main() -> anyhow::Result<()> {
    let mut cap = Capture::load(CaptureOptions { payload_cap: 4096, ring_buffer_mb: 16 })?;
    let fd = cap.ring_fd();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(6);
    while std::time::Instant::now() < deadline {
        let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        unsafe { libc::poll(&mut p, 1, 200) };
        cap.drain(|b| match event::decode(b) { Ok(e) => println!("{:?} {:?} {:?}", e.conn, e.endpoints, match &e.kind { event::EventKind::Data{direction, total_len, payload, ..} => format!("{direction:?} {total_len} {:?}", String::from_utf8_lossy(&payload[..payload.len().min(60)])), k => format!("{k:?}")}), Err(e) => println!("ERR {e}") });
    }
    println!("{:?}", cap.stats()?);
    Ok(())
}
