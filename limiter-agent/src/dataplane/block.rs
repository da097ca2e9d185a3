//! The block list (penalty box): entries the agent puts in and takes out, and the
//! `CONFIG_FLAG_NO_BLOCK` flag that lets the program skip the list while it is empty.

use std::{net::IpAddr, time::Duration};

use limiter_common::{Addr, BlockEntry, ipv4_mapped, names};

use super::{Dataplane, Result, boot_time_ns, ignore_missing, map_err};

impl Dataplane {
    /// Puts `addr` (IPv6: its source prefix) in the block list for `duration`.
    pub fn block(&mut self, addr: IpAddr, duration: Duration) -> Result<()> {
        let key = self.block_key(addr);
        let expires_at_ns = boot_time_ns().saturating_add(duration.as_nanos().min(u128::from(u64::MAX)) as u64);
        // The program must look the list up before the entry exists, not after.
        if self.block_empty {
            self.block_empty = false;
            self.write_config()?;
        }
        self.block.insert(key, BlockEntry { expires_at_ns }, 0).map_err(map_err(names::BLOCK, "inserting"))
    }

    /// Removes `addr` from the block list.
    pub fn unblock(&mut self, addr: IpAddr) -> Result<()> {
        let key = self.block_key(addr);
        ignore_missing(self.block.remove(&key)).map_err(map_err(names::BLOCK, "removing"))?;
        self.refresh_block_flag()
    }

    /// Deletes expired block entries; returns how many.
    pub fn expire_blocks(&mut self) -> Result<usize> {
        let now = boot_time_ns();
        let expired: Vec<Addr> =
            self.block.iter().filter_map(|e| e.ok()).filter(|(_, v)| v.expires_at_ns <= now).map(|(k, _)| k).collect();
        for k in &expired {
            ignore_missing(self.block.remove(k)).map_err(map_err(names::BLOCK, "removing"))?;
        }
        if !expired.is_empty() {
            self.refresh_block_flag()?;
        }
        Ok(expired.len())
    }

    /// Sets `CONFIG_FLAG_NO_BLOCK` once the block list is empty (only the agent writes it).
    fn refresh_block_flag(&mut self) -> Result<()> {
        let empty = self.block.keys().next().is_none();
        if empty != self.block_empty {
            self.block_empty = empty;
            self.write_config()?;
        }
        Ok(())
    }

    pub(super) fn block_key(&self, addr: IpAddr) -> Addr {
        match addr {
            IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
            IpAddr::V6(v6) => {
                let prefix = u32::from(self.options.ipv6_source_prefix.min(128));
                let bits = u128::from_be_bytes(v6.octets());
                let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - prefix) };
                (bits & mask).to_be_bytes()
            }
        }
    }
}
