//! The kernel's `learned` map in memory, for the DNS unit tests; it can be told to fail.

use std::{
    collections::HashMap,
    io,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use ztseg_common::dns::{Learned, LearnedValue};

use super::store::LearnedMap;

/// The kernel map, in memory; can be told to fail writes.
#[derive(Clone, Default)]
pub struct FakeMap(pub Arc<Mutex<FakeState>>);

#[derive(Default)]
pub struct FakeState {
    pub entries: HashMap<Learned, LearnedValue>,
    pub fail_after: Option<usize>,
}

impl LearnedMap for FakeMap {
    fn write(&mut self, key: &Learned, value: &LearnedValue) -> io::Result<()> {
        let mut s = self.0.lock().unwrap();
        match &mut s.fail_after {
            Some(0) => return Err(io::Error::other("map full")),
            Some(n) => *n -= 1,
            None => {}
        }
        s.entries.insert(*key, *value);
        Ok(())
    }

    fn delete(&mut self, key: &Learned) -> io::Result<()> {
        self.0.lock().unwrap().entries.remove(key);
        Ok(())
    }

    fn all(&self) -> io::Result<Vec<(Learned, LearnedValue)>> {
        Ok(self.0.lock().unwrap().entries.iter().map(|(k, v)| (*k, *v)).collect())
    }
}

impl FakeMap {
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().entries.len()
    }

    pub fn get(&self, cgroup_id: u64, addr: &str, proto: u8, port: u16) -> Option<LearnedValue> {
        let addr: IpAddr = addr.parse().unwrap();
        self.0.lock().unwrap().entries.get(&super::store::key(cgroup_id, addr, proto, port)).copied()
    }
}
